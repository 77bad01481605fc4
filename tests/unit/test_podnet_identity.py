"""Identity allocation: one identity per label set, stable, reserved numbers kept free."""

from hypothesis import given
from hypothesis import strategies as st

from bpfnet.podnet.identity import (
    CLUSTER_FIRST,
    CLUSTER_LAST,
    HOST,
    LOCAL_FLAG,
    WORLD,
    LabelSet,
    allocate_identities,
    allocate_local_identities,
    describe,
)


def test_reserved_numbers_are_ciliums():
    assert (HOST, WORLD) == (1, 2)
    assert describe(1) == "reserved:host" and describe(2) == "reserved:world"
    assert describe(LOCAL_FLAG | 5) == "local:5" and describe(300) == "300"


def test_same_labels_same_identity_and_sources_kept_apart():
    ns = {"kubernetes.io/metadata.name": "x"}
    a = LabelSet.of({"pod": "a"}, ns)
    a2 = LabelSet.of({"pod": "a"}, dict(ns))
    swapped = LabelSet.of({}, {**ns, "pod": "a"})  # a namespace label is not a pod label
    ids = allocate_identities([a, a2, swapped])
    assert len(ids) == 2 and ids[a] == ids[a2] != ids[swapped]
    assert all(CLUSTER_FIRST <= i <= CLUSTER_LAST for i in ids.values())


labels = st.dictionaries(st.sampled_from("abcd"), st.sampled_from("12"), max_size=3)
label_sets = st.lists(st.builds(LabelSet.of, labels, labels), max_size=30)


@given(label_sets, st.randoms())
def test_allocation_depends_only_on_the_set(sets, rnd):
    shuffled = list(sets)
    rnd.shuffle(shuffled)
    first = allocate_identities(sets)
    assert first == allocate_identities(shuffled)
    assert len(set(first.values())) == len(first)  # distinct label sets, distinct numbers


@given(label_sets, st.builds(LabelSet.of, labels, labels))
def test_adding_a_set_keeps_the_others(sets, extra):
    before = allocate_identities(sets)
    after = allocate_identities(sets + [extra])
    # Only a hash collision with the newcomer could move one; with 2^24 slots there is none here.
    assert all(after[ls] == number for ls, number in before.items())


def test_collisions_probe_forward_deterministically():
    # A span of one slot per name forces every name after the first to probe.
    from bpfnet.podnet.identity import _allocate
    numbers = _allocate(["c", "a", "b"], 10, 12)
    assert sorted(numbers.values()) == [10, 11, 12]
    assert numbers == _allocate(["b", "c", "a"], 10, 12)


def test_local_identities_have_bit_24():
    ids = allocate_local_identities(["10.0.0.0/8", "10.0.0.2/32"])
    assert all(i & LOCAL_FLAG for i in ids.values()) and len(set(ids.values())) == 2
