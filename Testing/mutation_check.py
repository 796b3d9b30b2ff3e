"""Deliberate bugs that the suite must catch: apply each, run the tests that guard it, expect a failure.

Not part of `make test` (it runs the guarding tests once per bug): `make mutants`, or
`python Testing/mutation_check.py [NAME ...]`. Each bug is a one-line edit of the library;
the file is restored afterwards whatever happens. A bug that no test catches is a hole in
the suite: write a test that asserts the behaviour against an answer the code did not compute.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = "MedFM/MedFMLib/"
SECURITY = "Testing/remote/test_security.py::"
JOBS = SECURITY + "test_jobs_one_per_session_on_a_bounded_pool_and_calls_never_overlap_them"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant("cli-negative-as-positive", LIB + "cli.py",
           "[(point, False) for point in negatives]",
           "[(point, True) for point in negatives]", ("Testing/test_cli.py",)),
    Mutant("cli-keep-connected-ignored", LIB + "interaction/cleanup.py", "    if keep_connected:", "    if False:",
           ("Testing/test_cli.py",)),
    Mutant("cli-fill-holes-ignored", LIB + "interaction/cleanup.py", "    if fill:", "    if False:",
           ("Testing/test_cli.py",)),
    Mutant("cli-min-score-ignored", LIB + "cli.py", "    if args.min_score is not None:", "    if False:",
           ("Testing/test_cli.py",)),
    Mutant("cli-window-ignored", LIB + "cli.py", "        window = parse_window(args.window)",
           "        window = (parse_window(args.window), None)[1]", ("Testing/test_cli.py",)),
    Mutant("cli-preset-ignored", LIB + "cli.py", "        window = preset_window(args.preset)",
           "        window = (preset_window(args.preset), None)[1]", ("Testing/test_cli.py",)),
    Mutant("cli-verify-exits-0", LIB + "cli.py", "        if failed:\n", "        if False:\n",
           ("Testing/models/test_store.py", "Testing/test_cli.py")),
    Mutant("roi-slice-range-one-short", LIB + "imaging/geometry.py",
           "    first, last = max(first, 0), min(last, count - 1)\n",
           "    first, last = max(first, 0), min(last, count - 1) - 1\n", ("Testing/imaging", "Testing/interaction")),
    Mutant("roi-corners-twice-the-size", LIB + "mrml/bridge.py",
           "corners = np.c_[signs * size / 2.0, np.ones(8)]", "corners = np.c_[signs * size, np.ones(8)]",
           ("Testing/mrml",)),
    Mutant("prompt-seeds-ignore-box-and-roi", LIB + "interaction/session.py",
           "if state.is_anchor and not positives and state.mask is not None:",
           "if False and state.is_anchor and not positives and state.mask is not None:",
           ("Testing/interaction", "Testing/test_cli.py")),
    Mutant("carried-box-not-clamped-to-roi", LIB + "interaction/propagation.py",
           "        if bound is not None:  # a 3D box is a hard limit", "        if False:",
           ("Testing/interaction",)),
    Mutant("sam2-tracking-ignores-roi-footprint", LIB + "interaction/propagation.py",
           "                mask = mask & box_mask(mask.shape, footprint)", "                pass",
           ("Testing/engines/test_sam2.py",)),
    Mutant("download-size-check-dropped", LIB + "models/download.py",
           "if expected_size is not None and partial.stat().st_size != expected_size:",
           "if False and expected_size is not None:", ("Testing/models",)),
    Mutant("server-jobs-and-encode-without-token", LIB + "remote/server/app.py",
           '        supplied = request.headers.get("authorization", "")\n',
           '        supplied = request.headers.get("authorization", "")\n'
           '        if request.url.path.endswith(("/encode", "/jobs")) or "/jobs/" in request.url.path:\n'
           '            return await call_next(request)\n', ("Testing/remote/test_server.py",)),
    Mutant("server-retry-by-seq-removed", LIB + "remote/server/operations.py",
           "if sequence is not None and sequence == served.last_sequence and served.last_reply is not None:",
           "if False:", ("Testing/remote/test_server.py",)),
    # Issue 13: what a hostile client, catalog or server could do.
    Mutant("array-size-in-int64", LIB + "remote/protocol.py", "    count = math.prod(shape)\n",
           "    count = int(np.prod(np.array(shape, dtype=np.int64)))\n", ("Testing/remote/test_protocol.py",)),
    Mutant("admission-reserves-nothing", LIB + "remote/server/sessions.py", "            self._reserved += needed\n",
           "            pass\n", (SECURITY + "test_forty_concurrent_uploads_never_pass_the_total_limit_together",)),
    Mutant("jobs-without-limit", LIB + "remote/server/sessions.py", "        if self.busy:\n            raise Limit",
           "        if False:\n            raise Limit", (JOBS,)),
    Mutant("calls-overlap-jobs", LIB + "remote/server/operations.py", "        if served.busy:  # its job holds",
           "        if False:  #", (JOBS,)),
    Mutant("no-request-head-deadline", LIB + "remote/server/guard.py",
           '            self._deadline = self.loop.call_later(self.header_seconds, self._drop, "slow")',
           "            self._deadline = None",
           (SECURITY + "test_hundreds_of_silent_or_dribbling_connections_do_not_lock_out_real_clients",)),
    Mutant("whole-session-ids-logged", LIB + "remote/server/guard.py", '    return _SESSION_ID.sub(r"\\1\\2…", path)',
           "    return path", (SECURITY + "test_logs_hold_short_session_ids_and_an_audit_trail",)),
    Mutant("plain-http-catalog-allowed", LIB + "models/catalog.py",
           '    if url.startswith("http://") and pinned is None:', "    if False:", ("Testing/models",)),
    Mutant("remove-deletes-any-file", LIB + "models/store.py",
           '        if path.is_file() and name not in self._read_registry()["files"]:', "        if False:",
           ("Testing/models",)),
    Mutant("client-reply-unbounded", LIB + "remote/client.py", "max_bytes=(self.volume.array.size + 7) // 8)",
           "max_bytes=2**62)", (SECURITY + "test_a_server_that_sends_a_bomb_back_cannot_fill_the_clients_memory",)),
    Mutant("client-replay-skips-propagations", LIB + "remote/client.py",
           '            if method == "apply_plan":\n                planned',
           '            if method == "apply_plan":\n                continue\n                planned',
           ("Testing/remote/test_remote.py",)),
    # Issue 15: propagation on real anatomy.
    Mutant("appearance-stop-ignored", LIB + "interaction/propagation.py",
           "    if object_fraction < criteria.min_object_fraction:", "    if False:",
           ("Testing/interaction/test_propagation.py::test_stop_criteria_each_reason",)),
    Mutant("challenge-box-bounds-every-slice", LIB + "interaction/propagation.py",
           "        if self.roi is None or not self.options.roi_bounds_footprint:", "        if self.roi is None:",
           ("Testing/interaction/test_propagation.py::test_a_3d_box_bounds_every_slice_or_only_its_range",)),
    Mutant("box-only-click-without-a-box", LIB + "interaction/session.py",
           "            state = replace(state, carried=box_from_neighbour(obj.slices, state.plane) or state.carried)",
           "            pass",
           ("Testing/interaction/test_propagation.py::test_a_click_off_the_propagated_range_borrows_the_nearest_box",)),
    Mutant("carried-box-never-widens", LIB + "interaction/propagation.py",
           "    return None if np.allclose(wider, box) else wider", "    return None",
           ("Testing/interaction/test_propagation.py::test_a_carried_box_widens_only_on_the_sides_its_mask_reaches",
            "Testing/engines/test_litemedsam.py::test_litemedsam_one_box_propagated_through_brain1_stays_on_the_tumour")),
    Mutant("box-only-click-refines-its-own-logits", LIB + "interaction/session.py",
           'refine_from.has_any_prompt and self.engine.prompt_types == ("box",):',
           "refine_from.has_any_prompt and False:",
           ("Testing/interaction/test_box_only.py::test_a_box_only_model_decodes_a_click_from_its_box_afresh",)),
    Mutant("widening-chases-a-leak", LIB + "interaction/propagation.py",
           "        return first\n", "        return state\n",
           ("Testing/interaction/test_box_only.py::test_a_carried_box_is_widened_only_when_the_mask_comes_to_fit_a_wider_one",)),
    Mutant("negative-click-cuts-the-object", LIB + "interaction/box_prompts.py",
           "_share_outside(mask, moved) <= MAX_CUT_SHARE", "True",
           ("Testing/interaction/test_box_only.py::test_a_negative_click_moves_a_side_past_a_fringe_but_never_through_the_object",)),
    Mutant("box-only-model-given-the-clicks", LIB + "interaction/session.py",
           "            points, labels = [], []\n", "            pass\n",
           ("Testing/interaction/test_box_only.py::test_a_box_only_model_is_given_the_box_and_not_the_clicks",)),
    Mutant("unanswered-click-said-nothing", LIB + "interaction/session.py",
           'update = replace(update, note=unanswered_click_note(self.engine.model_name, after, click))',
           "pass",
           ("Testing/interaction/test_click_corrections.py::test_a_click_that_nothing_can_answer_is_said_so",
            "Testing/mrml/test_controller.py::test_a_click_a_box_only_model_cannot_answer_is_said_in_the_status",
            "Testing/test_cli.py::test_segment_says_once_that_a_box_only_model_left_the_clicks_unanswered")),
    Mutant("box-only-click-corrects-nothing", LIB + "interaction/session.py",
           "mask = corrected_by_clicks(image, mask, clicks_on_slice(self.volume, state.plane, state.points))",
           "pass",
           ("Testing/interaction/test_click_corrections.py::test_a_box_only_model_session_corrects_its_mask_around_a_negative_click",
            "Testing/evaluation/test_litemedsam_cvpr25.py")),
    Mutant("click-correction-redraws-the-whole-outline", LIB + "interaction/click_corrections.py",
           "    decided = near[window]\n", "    decided = np.ones_like(near[window])\n",
           ("Testing/interaction/test_click_corrections.py::test_only_pixels_near_a_contradicted_click_change",)),
    Mutant("click-correction-trusts-the-mask-at-a-negative-click", LIB + "interaction/click_corrections.py",
           "            object_seeds &= ~distrusted\n", "            pass\n",
           ("Testing/interaction/test_click_corrections.py::test_a_negative_click_in_a_leak_removes_the_leak_and_keeps_the_object",)),
    Mutant("click-correction-keeps-background-seeds-at-a-positive-click", LIB + "interaction/click_corrections.py",
           "            background_seeds &= ~distrusted\n", "            pass\n",
           ("Testing/interaction/test_click_corrections.py::test_a_positive_click_in_a_missed_part_adds_that_part",)),
    Mutant("click-correction-coarse-walk-inverted", LIB + "interaction/click_corrections.py",
           'side = resize(chance, image.shape, order=1, mode="edge") > 0.5',
           'side = resize(chance, image.shape, order=1, mode="edge") < 0.5',
           ("Testing/interaction/test_click_corrections.py",)),
    Mutant("openvino-tinyvit-converted-with-the-split", LIB + "engines/runtime.py",
           "        module.separate_qkv = True\n", "        pass\n",
           ("Testing/engines/test_litemedsam.py::test_litemedsam_in_openvino_gives_torchs_embedding_and_runs_no_split",)),
    Mutant("zoom-keeps-the-answer-the-model-rates-lower", LIB + "interaction/zoom.py",
           "zoom_won = zoomed.score > whole.score", "zoom_won = zoomed.score <= whole.score",
           ("Testing/interaction/test_zoom.py::test_litemedsam_outlines_a_small_lesion_better_with_the_zoom",)),
    Mutant("zoom-on-propagated-slices-too", LIB + "interaction/session.py",
           "zoomed = self.zoom is not None and state.origin != PROPAGATED", "zoomed = self.zoom is not None",
           ("Testing/interaction/test_zoom.py::test_litemedsam_one_box_propagated_through_breast1",)),
    Mutant("zoom-crop-never-reused", LIB + "interaction/zoom.py",
           "            if fits(entry[0], box):\n", "            if False:\n",
           ("Testing/interaction/test_zoom.py::test_litemedsam_one_box_propagated_through_breast1",)),
    Mutant("controller-encodes-the-box-and-its-crop-on-the-gui-thread", LIB + "mrml/controller.py",
           "            return planes + box_encodings(self.session, *self.sync.box_of_roi(roi, view))\n",
           "            return planes\n",
           ("Testing/mrml/test_controller.py::test_a_small_box_and_its_zoom_crop_are_encoded_off_the_gui_thread",)),
    Mutant("grown-box-never-tried", LIB + "interaction/propagation.py",
           "        if not fraction or state is None", "        if True or state is None",
           ("Testing/engines/test_litemedsam.py::test_a_box_carried_from_a_small_section_is_grown_where_the_model_rates_that_clearly_higher",)),
    Mutant("decoder-prepared-part-kept-after-fine-tuning", LIB + "engines/sam.py",
           " or prepared.weights != weights_version(self.model):", ":",
           ("Testing/engines/test_sam_decoder.py",)),
    Mutant("decoder-first-block-keys-without-position", LIB + "engines/sam_decoder.py",
           "    keys_with_position = image + position\n", "    keys_with_position = image\n",
           ("Testing/engines/test_sam_decoder.py",)),
    Mutant("decoder-upscaled-pixels-out-of-order", LIB + "engines/sam_decoder.py",
           ".permute(6, 0, 2, 4, 1, 3, 5)", ".permute(6, 0, 4, 2, 1, 3, 5)",
           ("Testing/engines/test_sam_decoder.py",)),
    Mutant("decoder-refining-click-ignores-the-previous-mask", LIB + "engines/sam.py",
           "prepared = prepare_image(self.model, embedding.features, dense)",
           "prepared = self.prepared_image(embedding.features)",
           ("Testing/engines/test_sam_decoder.py",)),
    Mutant("classic-negative-click-wipes-the-object", LIB + "engines/classic.py",
           "_KEEP_SHARE = 0.1", "_KEEP_SHARE = 0.0",
           ("Testing/engines/test_engines.py::test_classic_negative_click_inside_the_object_cuts_a_disc_and_keeps_the_object",)),
    Mutant("classic-ignores-appearance", LIB + "engines/classic.py", "        if prompts.appearance is not None:",
           "        if False:", ("Testing/interaction/test_real_propagation.py",)),
    Mutant("controller-drag-decodes-at-every-move", LIB + "mrml/controller.py",
           "        if self._dragSince is None:\n            self._dragSince = self.clock()",
           "        self.requestSync()", ("Testing/mrml/test_controller.py",)),
    Mutant("controller-apply-ignores-masking", LIB + "mrml/controller.py",
           "                editor_node=self.editorNode,", "                editor_node=None,",
           ("Testing/mrml/test_controller.py",)),
    Mutant("controller-no-repropagation", LIB + "mrml/controller_propagation.py",
           "        if corrected:", "        if False:", ("Testing/mrml/test_controller.py",)),
    Mutant("app-click-in-the-wrong-place", LIB + "app/views.py",
           "        return self.xyToRas(x * ratio, height - 1 - y * ratio)",
           "        return self.xyToRas(x * ratio, y * ratio)", ("Testing/app/test_app.py",)),
    # Native 3D models
    Mutant("volume-stroke-not-on-its-slice", LIB + "interaction/volume_session.py",
           "            voxels[:, column] = np.clip(np.rint(voxels[0, column]), 0, "
           "self.volume.array.shape[column] - 1)",
           "            pass", ("Testing/interaction/test_volume_session.py",)),
    Mutant("volume-undo-keeps-the-engine-state", LIB + "interaction/volume_session.py",
           "            self._engine_object = None  # the engine's interactions no longer match the mask",
           "            pass", ("Testing/interaction/test_volume_session.py",)),
    Mutant("volume-region-offset-dropped", LIB + "engines/volumetric.py",
           "        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.mask.shape))",
           "        return tuple(slice(0, n) for n in self.mask.shape)",
           ("Testing/interaction/test_volume_session.py", "Testing/engines/test_nninteractive.py")),
    Mutant("volume-box-replaces-nothing", LIB + "interaction/volume_session.py",
           "        if earlier and not keep_other_slices:", "        if False:",
           ("Testing/interaction/test_volume_session.py", "Testing/mrml/test_controller_3d.py")),
    Mutant("lasso-outline-only", LIB + "imaging/drawing.py",
           "    plane[low[0] : high[0] + 1, low[1] : high[1] + 1] = inside",
           "    pass", ("Testing/interaction/test_volume_session.py",)),
    Mutant("cvpr25-box-on-the-wrong-slice", LIB + "evaluation/protocols.py",
           "            k = box.drawn_on if box.drawn_on is not None else box.middle", "            k = box.k0",
           ("Testing/evaluation/test_evaluate.py",)),
]


def run(mutant: Mutant) -> tuple[bool, float, str]:
    """Apply the bug, run its tests; (caught, seconds, last line of pytest's output)."""
    path = ROOT / mutant.path
    original = path.read_text(encoding="utf-8")
    if original.count(mutant.old) != 1:
        raise SystemExit(f"{mutant.name}: the code to mutate is not found exactly once in {mutant.path}")
    started = time.monotonic()
    try:
        path.write_text(original.replace(mutant.old, mutant.new), encoding="utf-8")
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests],
            cwd=ROOT, capture_output=True, text=True, encoding="utf-8",
        )  # fmt: skip
    finally:
        path.write_text(original, encoding="utf-8")
    lines = result.stdout.strip().splitlines()
    return result.returncode != 0, time.monotonic() - started, lines[-1] if lines else result.stderr[-200:]


def main(names: list[str]) -> int:
    # A SIGTERM must unwind through run()'s finally, or the library would keep the bug.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    chosen = [m for m in MUTANTS if not names or m.name in names]
    survived = []
    for index, mutant in enumerate(chosen, 1):
        caught, seconds, summary = run(mutant)
        verdict = "caught  " if caught else "SURVIVED"
        print(f"[{index}/{len(chosen)}] {verdict} {mutant.name} ({seconds:.0f} s): {summary}", flush=True)
        if not caught:
            survived.append(mutant.name)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} deliberate bugs caught" +
          (f"; survived: {', '.join(survived)}" if survived else ""))  # fmt: skip
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
