"""The `make test-fast` list (tests/fast_subset.py): how an entry matches a test, and that every entry names
a test file that exists (an entry naming a missing test in a collected file stops collection)."""

import os

from fast_subset import FAST, NOT_FAST, ROOT, _matches, _our_modules


def test_an_entry_is_a_file_a_test_or_one_parametrisation():
    nodeid = "tests/test_views.py::test_ops_are_timms_own[Rotate]"
    for entry in ("tests/test_views.py", "tests/test_views.py::test_ops_are_timms_own", nodeid):
        assert _matches(nodeid, entry), entry
    for entry in ("tests/test_view", "tests/test_views.py::test_ops", "tests/test_views.py::test_ops_are_timms_own[R"):
        assert not _matches(nodeid, entry), entry


def test_every_entry_names_an_existing_file_and_the_modules_are_ours():
    for entry in FAST + NOT_FAST:
        assert os.path.isfile(os.path.join(ROOT, entry.split("::")[0])), entry
    mods = dict(_our_modules())
    assert {"storage", "pipeline.sources", "pipeline.stage1.precompute", "student.train"} <= set(mods)
