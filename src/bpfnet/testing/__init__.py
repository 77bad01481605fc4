"""Test oracles and helpers: conformance cases and a reference policy evaluator. Tests and
benchmarks import this package; the apps never do."""
