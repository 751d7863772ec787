"""Unit tests of restore-distributed.sh's pure parts (pipelines/dpir_ray/plan.py and progress.py):
planning, resume, the join's timeline. Plain Python: no GStreamer, no Ray. tests/distributed.rs
runs them (`python3 -m unittest discover -s tests/python`, with pipelines/ on PYTHONPATH)."""

import io
import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINES = os.path.join(HERE, "..", "..", "pipelines")
sys.path.insert(0, PIPELINES)

from dpir_ray import plan  # noqa: E402
from dpir_ray.progress import EventLog, Progress, fmt_time  # noqa: E402


def clips_at(*frames):
    return [{"index": i, "frame": f, "reason": "start" if i == 0 else "scene-cut"} for i, f in enumerate(frames)]


class PlanningTest(unittest.TestCase):
    def test_whole_clips_are_grouped_to_about_the_chunk_size(self):
        # The joined test input: cuts at 0, 11, 26, 36 of 52 frames.
        chunks = plan.plan_chunks(52, clips_at(0, 11, 26, 36), 15)
        self.assertEqual([(c["first"], c["frames"]) for c in chunks], [(0, 11), (11, 15), (26, 10), (36, 16)])
        chunks = plan.plan_chunks(52, clips_at(0, 11, 26, 36), 26)
        self.assertEqual([(c["first"], c["frames"]) for c in chunks], [(0, 26), (26, 26)])
        self.assertEqual([c["first_clip"] for c in chunks], [0, 2])
        # Clip frames are relative to their chunk.
        self.assertEqual([k["frame"] for k in chunks[1]["clips"]], [0, 10])

    def test_a_clip_longer_than_a_chunk_is_a_chunk_of_its_own_never_split(self):
        chunks = plan.plan_chunks(288, clips_at(0, 81), 48)
        self.assertEqual([(c["first"], c["frames"]) for c in chunks], [(0, 81), (81, 207)])

    def test_chunks_cover_every_frame_once_in_order(self):
        cuts = [0, 3, 4, 20, 21, 22, 60, 99]
        for size in (1, 5, 10, 30, 1000):
            chunks = plan.plan_chunks(100, clips_at(*cuts), size)
            self.assertEqual([c["id"] for c in chunks], list(range(len(chunks))))
            self.assertEqual(chunks[0]["first"], 0)
            for a, b in zip(chunks, chunks[1:]):
                self.assertEqual(a["first"] + a["frames"], b["first"])
            self.assertEqual(chunks[-1]["first"] + chunks[-1]["frames"], 100)
            self.assertTrue(all(c["first"] in cuts for c in chunks), "chunks start at cuts")

    def test_bad_clip_lists_are_refused(self):
        for n, clips in [(10, []), (10, clips_at(1, 5)), (10, clips_at(0, 5, 5)), (10, clips_at(0, 10))]:
            with self.assertRaises(ValueError):
                plan.plan_chunks(n, clips, 4)

    def test_job_key_and_plan_id_change_with_what_changes_the_segments(self):
        a = plan.job_key("/f.ogv", 10, 5, ["scale=2"], 48, "abc")
        self.assertEqual(a, plan.job_key("/f.ogv", 10, 5, ["scale=2"], 48, "abc"))
        for other in (plan.job_key("/f.ogv", 11, 5, ["scale=2"], 48, "abc"),
                      plan.job_key("/f.ogv", 10, 5, ["scale=4"], 48, "abc"),
                      plan.job_key("/f.ogv", 10, 5, ["scale=2"], 24, "abc"),
                      plan.job_key("/f.ogv", 10, 5, ["scale=2"], 48, "abd")):
            self.assertNotEqual(a, other)
        self.assertEqual(plan.plan_id(b"x"), plan.plan_id(b"x"))
        self.assertNotEqual(plan.plan_id(b"x"), plan.plan_id(b"y"))

    def test_actor_slots_are_gpus_or_cpus_over_cpus_per_task(self):
        self.assertEqual(plan.actor_slots({"CPU": 8.0}, 2, 0), 4)
        self.assertEqual(plan.actor_slots({"CPU": 8.0, "GPU": 3.0}, 1, 1), 3)
        self.assertEqual(plan.actor_slots({"CPU": 2.0, "GPU": 4.0}, 1, 1), 2, "a worker needs its CPU too")
        self.assertEqual(plan.actor_slots({"CPU": 1.0}, 2, 0), 0)


class SegmentFilesTest(unittest.TestCase):
    def test_kinds_name_their_codec_and_crf(self):
        mkv, mp4 = plan.segment_kind("mkv"), plan.segment_kind("mp4", 20)
        self.assertEqual(plan.segment_file(3, mkv), "chunk-00003.ffv1.mkv")
        self.assertEqual(plan.record_file(3, mp4), "chunk-00003.h264-crf20.json")
        self.assertEqual(plan.segment_file(3, mp4), "chunk-00003.h264-crf20.mkv")
        self.assertNotEqual(plan.segment_kind("mp4", 18), mp4)
        with self.assertRaises(plan.Fail):
            plan.segment_kind("mp4", 52)
        with self.assertRaises(plan.Fail):
            plan.segment_kind("avi")

    def test_only_our_files_are_ours_and_temporary_ones_are_found(self):
        names = ["plan.json", "plan.json.tmp-12", "chunk-00001.ffv1.mkv", "chunk-00001.ffv1.json",
                 "chunk-00002.h264-crf18.mkv.tmp-77-0a1b2c", "chunk-00002.h264-crf18.json.tmp-77-0a1b2c",
                 "notes.txt", "chunk-1.mkv", "film.mkv", "chunk-00001.ffv1.mkv.bak"]
        self.assertEqual(plan.our_files(names), names[:6])
        self.assertEqual(plan.temp_files(names), ["plan.json.tmp-12", "chunk-00002.h264-crf18.mkv.tmp-77-0a1b2c",
                                                  "chunk-00002.h264-crf18.json.tmp-77-0a1b2c"])
        self.assertEqual(plan.temp_file("/w/chunk-00001.ffv1.mkv", "9-ab"), "/w/chunk-00001.ffv1.mkv.tmp-9-ab")

    def test_a_record_needs_its_checksums(self):
        c = {"id": 0, "first": 0, "frames": 5}
        with self.assertRaises(ValueError):
            plan.make_record(c, plan.segment_kind("mkv"), segment="x", size=1)


class ResumeTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.work = self.dir.name
        self.kind = plan.segment_kind("mkv")
        self.chunks = plan.plan_chunks(52, clips_at(0, 11, 26, 36), 15)

    def tearDown(self):
        self.dir.cleanup()

    def finish(self, c, data=b"segment", kind=None):
        kind = kind or self.kind
        path = os.path.join(self.work, plan.segment_file(c["id"], kind))
        with open(path, "wb") as f:
            f.write(data)
        rec = plan.make_record(c, kind, segment=os.path.basename(path), size=len(data),
                               sha256=plan.sha256_file(path), stream_sha256="s")
        with open(os.path.join(self.work, plan.record_file(c["id"], kind)), "w") as f:
            json.dump(rec, f)
        return path

    def test_nothing_recorded_means_everything_to_render(self):
        done, todo, corrupt = plan.scan(self.work, self.chunks, self.kind)
        self.assertEqual((done, [c["id"] for c in todo], corrupt), ({}, [0, 1, 2, 3], []))

    def test_recorded_chunks_with_intact_segments_are_done(self):
        self.finish(self.chunks[0])
        self.finish(self.chunks[2], b"another")
        done, todo, corrupt = plan.scan(self.work, self.chunks, self.kind)
        self.assertEqual(sorted(done), [0, 2])
        self.assertEqual([c["id"] for c in todo], [1, 3])
        self.assertEqual(corrupt, [])

    def test_a_changed_or_missing_segment_is_corrupt_and_rendered_again(self):
        flipped = self.finish(self.chunks[0])
        with open(flipped, "r+b") as f:
            f.write(b"X")  # same size, other bytes
        truncated = self.finish(self.chunks[1])
        with open(truncated, "r+b") as f:
            f.truncate(3)
        os.unlink(self.finish(self.chunks[2]))
        self.finish(self.chunks[3])
        done, todo, corrupt = plan.scan(self.work, self.chunks, self.kind)
        self.assertEqual(sorted(done), [3])
        self.assertEqual(corrupt, [0, 1, 2])
        self.assertEqual([c["id"] for c in todo], [0, 1, 2])

    def test_records_of_another_kind_or_chunking_are_not_this_job_s(self):
        self.finish(self.chunks[0], kind=plan.segment_kind("mp4"))
        other = plan.plan_chunks(52, clips_at(0, 11, 26, 36), 26)
        self.finish(other[1])  # chunk 1 of another chunking: frames 26-51, not 11-25
        with open(os.path.join(self.work, plan.record_file(2, self.kind)), "w") as f:
            f.write("{not json")
        done, todo, corrupt = plan.scan(self.work, self.chunks, self.kind)
        self.assertEqual((done, corrupt), ({}, []))
        self.assertEqual(len(todo), 4)
        # The .mp4 kind sees its own record.
        done, _, _ = plan.scan(self.work, self.chunks, plan.segment_kind("mp4"))
        self.assertEqual(list(done), [0])


def x264_like(n):
    """Decode order of n frames in x264's b-pyramid GOP shape (I/P every 4th, B-refs between)."""
    order, i = [0], 1
    while i < n:
        p = min(i + 3, n - 1)
        order.append(p)
        mids = [f for f in (i + 1, i, i + 2) if f < p]
        order.extend(mids)
        i = p + 1
    return order


class TimelineTest(unittest.TestCase):
    def frames(self, n, step=66_666_667):
        return [{"rt": 1_000 + k * step, "dur": step} for k in range(n)]

    def test_ranks_follow_the_timestamps_not_the_arrival(self):
        pts = [133, 200, 333, 266, 400]
        self.assertEqual(plan.presentation_ranks(pts), [0, 1, 3, 2, 4])
        self.assertEqual(plan.reorder_depth(plan.presentation_ranks(pts)), 1)
        self.assertEqual(plan.reorder_depth([0, 1, 2]), 0)
        with self.assertRaises(ValueError):
            plan.presentation_ranks([1, 2, 2])

    def test_intra_frames_keep_the_film_s_timestamps(self):
        frames = self.frames(5)
        t = plan.Timeline(frames, 0, 0)
        got = [t.next(k) for k in range(5)]
        self.assertEqual(got, [(f["rt"], f["rt"], f["dur"]) for f in frames])
        self.assertTrue(t.complete())

    def test_reordered_segments_join_with_rising_decode_times_before_presentation(self):
        frames = self.frames(40)
        base = 10**12
        # Three segments (0-12, 13-29, 30-39), each its own x264-like GOP.
        bounds = [(0, 13), (13, 17), (30, 10)]
        t = plan.Timeline(frames, 2, base)
        out = []
        for first, n in bounds:
            order = x264_like(n)
            ranks = plan.presentation_ranks([frames[first + q]["rt"] for q in order])
            self.assertLessEqual(plan.reorder_depth(ranks), 2)
            out += [(first + q,) + t.next(first + q) for q in order]
        self.assertTrue(t.complete())
        dts = [d for _, _, d, _ in out]
        self.assertEqual(dts, sorted(set(dts)), "decode timestamps strictly rise, across joins too")
        for frame, pts, d, dur in out:
            self.assertEqual(pts, base + frames[frame]["rt"])
            self.assertLessEqual(d, pts)
            self.assertEqual(dur, frames[frame]["dur"])
        self.assertLess(dts[0], base + frames[0]["rt"], "the first decode time is before the first frame")

    def test_frames_missing_repeated_or_too_early_are_refused(self):
        t = plan.Timeline(self.frames(6), 1, 10**9)
        t.next(0)
        with self.assertRaises(ValueError):
            t.next(0)
        with self.assertRaises(ValueError):
            t.next(6)
        t.next(1)
        t.next(2)
        self.assertFalse(t.complete())
        # A base too small for the decode times before the first frame.
        self.assertRaises(ValueError, plan.Timeline, self.frames(3), 2, 1)

    def test_a_frame_decoded_further_ahead_than_the_delay_is_refused(self):
        t = plan.Timeline(self.frames(6), 0, 0)
        t.next(1)  # frame 1 first, frame 0 second: a reorder a delay of 0 cannot hold
        with self.assertRaises(ValueError):
            t.next(0)


class ProgressTest(unittest.TestCase):
    def test_the_bar_counts_finished_and_running_frames(self):
        out = io.StringIO()
        p = Progress(30, 10, None, out=out)
        self.assertEqual(p.interval, 10.0, "a line every 10 s when not on a terminal")
        p.t0 = 0.0
        p.finished = 10
        p.running = {3: ("t", 5)}
        self.assertIn("25/30 frames  83.3%", p.bar())
        self.assertIn("(1 chunk running)", p.bar())
        p.running = {}
        p.finished = 20
        p.close()
        self.assertIn("30/30 frames 100.0%", out.getvalue())
        p.line("chunk 1/3 done")
        self.assertTrue(out.getvalue().endswith("chunk 1/3 done\n"))
        self.assertEqual(fmt_time(3725), "1h02m05s")
        self.assertEqual(fmt_time(65), "1m05s")

    def test_the_event_log_drains_what_was_pushed_once(self):
        log = EventLog()
        log.push(("start", 1, "t"))
        log.push(("progress", 1, "t", 4))
        self.assertEqual(len(log.drain()), 2)
        self.assertEqual(log.drain(), [])


class PurityTest(unittest.TestCase):
    def test_planning_imports_neither_gstreamer_nor_ray(self):
        code = ("import sys; import dpir_ray.plan, dpir_ray.progress; "
                "bad = [m for m in ('gi', 'ray') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
        env = dict(os.environ, PYTHONPATH=PIPELINES)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


if __name__ == "__main__":
    unittest.main()
