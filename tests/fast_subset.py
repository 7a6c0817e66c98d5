"""`make test-fast`: the inner loop, a subset of the suite chosen here and run with `pytest -m fast`.

The subset is a list, not a marker written on each test: which tests are cheap is a property of the suite
as a whole (a module-scoped fixture that builds a store is paid once per file, whoever uses it), and one
list is easy to re-balance from a `pytest --durations=0` run. Every entry is a node-id prefix: a whole file,
one test, or one parametrisation; ``NOT_FAST`` takes tests back out of files listed whole. An entry that
matches nothing in a file that was collected is an error, so a rename cannot silently drop a test from the
loop. A test marked ``slow`` is never fast.

``--touched-modules`` (slower: it traces every call) checks what the subset is for: that it runs code in
every module under pipeline/, storage/ and student/. At the end it lists the modules none of whose functions
ran in this process (a module without functions counts once imported) and fails the session if any.
"""

from __future__ import annotations

import ast
import os
import sys
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pipeline", "storage", "student")

# Node-id prefixes (relative to the repository root) of the fast subset. Chosen from `--durations=0` runs of
# single files: unit tests of every module, plus the one cheapest end-to-end test per stage (a tiny
# precompute, train, inspect and verify in this process), leaving out what repeats a pipeline at scale,
# starts torchrun or fresh interpreters, or sweeps parameters. Measured 2026-12-02 with --touched-modules:
# 273 tests, every module touched, 6.2 minutes wall at load average 12 on 2 cores (1.6 CPU-minutes, the
# store-building fixtures of inspect, verify, examples and export the most); under 3 minutes on idle cores.
FAST = [
    # the layout, the error classes, the progress lines: pure checks
    "tests/test_layout.py",
    "tests/test_errors.py",
    "tests/test_fast_subset.py",
    "tests/test_progress.py::test_a_line_at_the_first_update_then_at_most_every_interval_then_at_close",
    "tests/test_progress.py::test_close_gives_the_mean_rate_since_the_first_line_and_the_time_in_all",
    "tests/test_progress.py::test_a_resumed_runs_first_jump_does_not_inflate_the_rate",
    "tests/test_progress.py::test_the_fleet_moves_n_and_refreshes_within_the_interval_rule",
    "tests/test_progress.py::test_disabled_prints_nothing_and_write_prints_a_line",
    "tests/test_progress.py::test_tqdm_on_a_terminal_lines_elsewhere",
    # storage/: both backends, soft targets, checkpoints, leases (not the tests that kill writer processes)
    "tests/test_storage.py::test_round_trip_and_addressing",
    "tests/test_storage.py::test_int32_ids_for_many_classes",
    "tests/test_storage.py::test_incomplete_units_refused",
    "tests/test_storage.py::test_rewrite_is_byte_identical",
    "tests/test_storage.py::test_spec_mismatch_names_the_field",
    "tests/test_storage.py::test_bad_inputs_are_refused",
    "tests/test_storage.py::test_check_finds_damage_and_names_unit",
    "tests/test_storage.py::test_count_flags_counts_exactly_from_the_flags_alone",
    "tests/test_storage.py::test_wds_tar_is_a_webdataset_shard",
    "tests/test_storage.py::test_values_encoding_is_lossless",
    "tests/test_storage.py::test_soft_targets_exact_at_tau_1",
    "tests/test_storage.py::test_hard_targets",
    "tests/test_storage.py::test_a_format_1_store_is_refused_with_one_line_to_recompute",
    "tests/test_soft_tau.py::test_stored_tail_makes_tempered_topk_and_tail_mass_exact",
    "tests/test_soft_tau.py::test_tail_lse_round_trips_in_both_backends",
    "tests/test_soft_tau.py::test_bad_tail_inputs_and_taus_are_refused",
    "tests/test_checkpoint.py::test_a_new_checkpoint_round_trips_and_is_marked",
    "tests/test_checkpoint.py::test_a_newer_format_and_a_partial_checkpoint_are_refused_in_one_line",
    "tests/test_checkpoint.py::test_unwrapping_prefers_raw_weights_and_keeps_a_prefix_only_some_keys_carry",
    "tests/test_checkpoint.py::test_an_interrupted_save_leaves_the_previous_checkpoint_and_no_temporary",
    "tests/test_fleet.py::test_a_lease_is_exclusive_until_it_expires_and_is_renewed_by_its_holder",
    "tests/test_fleet.py::test_a_lease_whose_holder_on_this_host_is_gone_is_stale_at_once",
    # pipeline/: sources (folders, tars, parquet, hostile input), recipes, views
    "tests/test_sources.py",
    "tests/test_parquet.py::test_index_by_glob_directory_file_and_brace",
    "tests/test_parquet.py::test_class_sorted_files_are_recut",
    "tests/test_parquet.py::test_a_shard_is_read_once_per_row_group_and_checked",
    "tests/test_parquet.py::test_hostile_parquet_is_one_line_exit_2",
    "tests/test_hardening_sources.py::test_a_tar_with_a_member_twice_is_refused_naming_tar_and_member",
    "tests/test_hardening_sources.py::test_a_label_beyond_classes_txt_names_the_sample",
    "tests/test_hardening_sources.py::test_16_bit_pngs_decode_to_their_high_byte",
    "tests/test_hardening_sources.py::test_a_fifo_named_like_an_image_is_skipped_counted_and_never_opened",
    "tests/test_hardening_sources.py::test_a_full_disk_names_the_disk_and_leaves_no_temporary",
    "tests/test_hardening_sources.py::test_a_negative_label_is_refused_at_indexing",
    "tests/test_hardening_sources.py::test_an_unreadable_image_is_a_permission_error_at_indexing",
    "tests/test_hardening_sources.py::test_the_manifest_records_size_and_crc32c_of_every_sample",
    "tests/test_hardening_sources.py::test_a_writer_stops_when_its_store_is_rebuilt_under_it",
    "tests/test_views.py",
    # pipeline/stage1/: the teacher's weights files, Lite0's renames; precompute runs in the inspect fixture
    "tests/test_teacher.py::test_renormalisation_equals_normalising_by_hand",
    "tests/test_teacher.py::test_views_are_resized_to_the_teacher_input",
    "tests/test_teacher.py::test_class_count_mismatch_is_an_error",
    "tests/test_teacher.py::test_missing_file",
    "tests/test_teacher.py::test_code_carrying_weights_are_refused_naming_the_cause_not_torchs_advice",
    "tests/test_teacher.py::test_efficientnet_lite0_loads_strictly",
    # pipeline/tools/: inspect's summary, sample, render and export on one session's stores; verify
    "tests/test_inspect.py::test_summary_text_and_json",
    "tests/test_inspect.py::test_sample_shows_params_and_labels",
    "tests/test_inspect.py::test_render_contact_sheets",
    "tests/test_inspect.py::test_export_rows_equal_the_reader",
    "tests/test_verify.py::test_good_store_passes",
    # student/: losses, the model, one real train (export's fixture), the api, fine-tuning's resampling
    "tests/test_losses.py",
    "tests/test_model.py",
    "tests/test_export.py::test_ema_and_raw_exports_hold_those_weights_and_bad_input_is_one_line",
    "tests/test_examples.py::test_api_batches_are_the_loaders_and_its_loss_is_deit_loss_terms",
    "tests/test_finetune.py::test_pos_embed_resample_is_deits_byte_for_byte_shrinking_and_growing",
]
# ... less these, inside the files listed whole (seconds on 2 busy cores, from --durations=0)
NOT_FAST = [
    "tests/test_views.py::test_fresh_process_renders_the_same_bytes",  # 49 s: fresh interpreters
    "tests/test_views.py::test_augmentation_statistics_match_the_recipe",  # 8 s: thousands of views
]


def pytest_addoption(parser):
    parser.addoption("--touched-modules", action="store_true",
                     help="fail unless every module under pipeline/, storage/, student/ ran a function")


def pytest_configure(config):
    if config.getoption("--touched-modules"):
        config.pluginmanager.register(TouchedModules(), "touched_modules")


def pytest_collection_modifyitems(config, items):
    used = set()
    collected_files = {item.nodeid.split("::")[0] for item in items}
    for item in items:
        entry = next((e for e in FAST if _matches(item.nodeid, e)), None)
        left_out = next((e for e in NOT_FAST if _matches(item.nodeid, e)), None)
        if left_out is not None:
            used.add(left_out)
        if entry is None or left_out is not None:
            continue
        if item.get_closest_marker("slow"):
            raise pytest.UsageError(f"tests/fast_subset.py lists {entry}, which holds the slow test {item.nodeid}")
        item.add_marker(pytest.mark.fast)
        used.add(entry)
    stale = [e for e in FAST + NOT_FAST if e.split("::")[0] in collected_files and e not in used]
    if stale:
        raise pytest.UsageError(f"tests/fast_subset.py lists tests that do not exist (renamed?): {stale}")


def _matches(nodeid: str, entry: str) -> bool:
    """A file, a test (with all its parametrisations) or one parametrisation."""
    return nodeid == entry or nodeid.startswith(entry + "::") or nodeid.startswith(entry + "[")


class TouchedModules:
    """Records which of our source files ran a function while the tests ran (a call event of an optimised
    code object: a function, method, lambda or comprehension, not a module or class body, which run on
    import). Functions run in worker or child processes are not seen."""

    def __init__(self):
        self.files = {path: mod for mod, path in _our_modules()}
        self.touched: set[str] = set()

    def _trace(self, frame, event, arg):
        code = frame.f_code
        if code.co_filename in self.files and code.co_flags & 0x1:  # CO_OPTIMIZED: a function's code
            self.touched.add(code.co_filename)
        return None  # no line events: only the call is wanted

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session):
        # from the first test on: a function run while collection imports modules (a decorator, say) is no test's
        sys.settrace(self._trace)
        threading.settrace(self._trace)

    def pytest_sessionfinish(self, session, exitstatus):
        sys.settrace(None)
        threading.settrace(None)
        untouched = sorted(mod for path, mod in self.files.items()
                           if path not in self.touched and _has_functions(path))
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        line = (f"touched modules: {len(self.files) - len(untouched)}/{len(self.files)}"
                + (f"; no function ran in: {', '.join(untouched)}" if untouched else ""))
        if reporter is not None:
            reporter.write_line(line)
        if untouched and session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _our_modules():
    for package in PACKAGES:
        for folder, _, names in os.walk(os.path.join(ROOT, package)):
            for name in sorted(names):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    yield rel.removesuffix(".__init__"), path


def _has_functions(path: str) -> bool:
    tree = ast.parse(open(path).read(), path)
    return any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) for n in ast.walk(tree))
