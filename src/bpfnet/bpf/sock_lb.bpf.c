// Socket-level load balancing (Cilium's "socket LB"): connect() and sendmsg() to a service address
// are rewritten to a backend before any packet exists, so there is no per-packet NAT. recvmsg() and
// getpeername() show the service address back to the application.
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "pod/sock_lb.h"
#include "pod/flow.h"
#include "pod/sock_maps.h"

// Set at load. 1: translate only sockets of the network namespaces in netns_scope (a pod
// network's nodes and pods: on one machine the hooks on the cgroup root also see namespaces that
// stand for hosts outside the cluster, which the tc fallback serves); 0: every socket.
const volatile __u8 scoped = 0;

enum verdict { REFUSE = 0, ALLOW = 1 };
enum kind { CONNECT, DATAGRAM };

static __always_inline void sock_read_addr(struct bpf_sock_addr *ctx, int family, __u32 *addr)
{
	if (family == 4) {
		addr[0] = ctx->user_ip4;
		addr[1] = addr[2] = addr[3] = 0;
	} else {
		addr[0] = ctx->user_ip6[0];
		addr[1] = ctx->user_ip6[1];
		addr[2] = ctx->user_ip6[2];
		addr[3] = ctx->user_ip6[3];
	}
}

static __always_inline void sock_write_addr(struct bpf_sock_addr *ctx, int family, const __u32 *addr)
{
	if (family == 4) {
		ctx->user_ip4 = addr[0];
	} else {
		ctx->user_ip6[0] = addr[0];
		ctx->user_ip6[1] = addr[1];
		ctx->user_ip6[2] = addr[2];
		ctx->user_ip6[3] = addr[3];
	}
}

static __always_inline void sock_count(__u32 service_id, enum kind kind, int refused)
{
	struct svc_counters *c = bpf_map_lookup_elem(&counters, &service_id);
	if (!c)
		return;
	if (refused)
		c->refused++;
	else if (kind == CONNECT)
		c->connects++;
	else
		c->datagrams++;
}

// A connect() of `client` sent to backend `be` instead of the service (IPv4: the pod network's).
static __always_inline void sock_report(struct bpf_sock_addr *ctx, const struct scope_client *client,
					const struct backend *be)
{
	struct flow_event event = {
		.time_ns = bpf_ktime_get_ns(),
		.dst_port = be->port,
		.family = 4,
		.protocol = ctx->protocol,
		.direction = FLOW_EGRESS,
		.verdict = FLOW_TRANSLATED,
		.src_identity = client->identity,
		.packets = 1,
	};

	event.src_addr[0] = client->addr;
	event.dst_addr[0] = be->addr[0];
	if (bpf_ringbuf_output(&sock_flows, &event, sizeof(event), 0) < 0) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&sock_flow_lost, &zero);

		if (lost)
			(*lost)++;
	}
}

// Rewrites the destination when it is a service; REFUSE when the service has no backend.
// `is_connect`: a connect() (reported when scoped), not a sendmsg().
static __always_inline int sock_translate(struct bpf_sock_addr *ctx, int family, enum kind kind,
					  int is_connect)
{
	struct scope_client *client = 0;
	struct svc_key key = {};
	if (scoped) {
		__u64 netns = bpf_get_netns_cookie(ctx);
		client = bpf_map_lookup_elem(&netns_scope, &netns);
		if (!client)
			return ALLOW;
	}
	sock_read_addr(ctx, family, key.addr);
	key.port = (__u16)ctx->user_port;
	key.proto = ctx->protocol;
	key.family = family;
	struct svc_value *svc = bpf_map_lookup_elem(&services, &key);
	if (!svc)
		return ALLOW;
	if (svc->count == 0) {
		sock_count(svc->service_id, kind, 1);
		return REFUSE;
	}
	struct backend *be = 0;
	struct affinity_key akey = {};
	if (svc->flags & SVC_FLAG_AFFINITY) {
		akey.netns_cookie = bpf_get_netns_cookie(ctx);
		akey.service_id = svc->service_id;
		be = bpf_map_lookup_elem(&affinity, &akey);
	}
	if (!be) {
		struct backend_key bkey = { .revision = svc->revision,
					    .slot = bpf_get_prandom_u32() % svc->count };
		be = bpf_map_lookup_elem(&backends, &bkey);
		if (!be)
			return ALLOW; // a revision being replaced: leave the socket alone
		if (svc->flags & SVC_FLAG_AFFINITY)
			bpf_map_update_elem(&affinity, &akey, be, BPF_ANY);
	}
	if (be->family != family)
		return ALLOW;
	{
		struct rev_key rkey;
		__builtin_memset(&rkey, 0, sizeof(rkey));
		rkey.socket_cookie = bpf_get_socket_cookie(ctx);
		rkey.port = be->port;
		__builtin_memcpy(rkey.addr, be->addr, sizeof(rkey.addr));
		struct rev_value rval = { .port = key.port };
		__builtin_memcpy(rval.addr, key.addr, sizeof(rval.addr));
		bpf_map_update_elem(&reverse, &rkey, &rval, BPF_ANY);
	}
	sock_write_addr(ctx, family, be->addr);
	ctx->user_port = be->port;
	sock_count(svc->service_id, kind, 0);
	if (client && is_connect && family == 4)
		sock_report(ctx, client, be);
	return ALLOW;
}

// Shows the service address instead of the backend's (recvmsg, getpeername).
static __always_inline int sock_untranslate(struct bpf_sock_addr *ctx, int family)
{
	struct rev_key rkey;
	__builtin_memset(&rkey, 0, sizeof(rkey));
	rkey.socket_cookie = bpf_get_socket_cookie(ctx);
	rkey.port = (__u16)ctx->user_port;
	sock_read_addr(ctx, family, rkey.addr);
	struct rev_value *rval = bpf_map_lookup_elem(&reverse, &rkey);
	if (rval) {
		sock_write_addr(ctx, family, rval->addr);
		ctx->user_port = rval->port;
	}
	return ALLOW;
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	return sock_translate(ctx, 4, ctx->protocol == IPPROTO_UDP ? DATAGRAM : CONNECT, 1);
}

SEC("cgroup/connect6")
int sock_connect6(struct bpf_sock_addr *ctx)
{
	return sock_translate(ctx, 6, ctx->protocol == IPPROTO_UDP ? DATAGRAM : CONNECT, 1);
}

SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock_translate(ctx, 4, DATAGRAM, 0);
}

SEC("cgroup/sendmsg6")
int sock_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock_translate(ctx, 6, DATAGRAM, 0);
}

SEC("cgroup/recvmsg4")
int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock_untranslate(ctx, 4);
}

SEC("cgroup/recvmsg6")
int sock_recvmsg6(struct bpf_sock_addr *ctx)
{
	return sock_untranslate(ctx, 6);
}

SEC("cgroup/getpeername4")
int sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock_untranslate(ctx, 4);
}

SEC("cgroup/getpeername6")
int sock_getpeername6(struct bpf_sock_addr *ctx)
{
	return sock_untranslate(ctx, 6);
}

char LICENSE[] SEC("license") = "GPL";
