"""The command: pipelines/restore-distributed.sh IN OUT.mkv|OUT.mp4 [dpirrestore properties…] [options]."""

import argparse
import json
import os
import signal
import sys
import time

from . import plan as planning
from .plan import Fail

PROG = "restore-distributed"

_cleanup = []
# The signal that stopped the run (SIGINT, SIGTERM), if any. Ray's core worker runs Python's signal
# handlers from inside ray.wait/ray.get and can drop the KeyboardInterrupt they raise, so the loop
# and the join also check this flag: an interrupted run never goes on to report success.
_stop = {"signal": None}


def check_interrupted():
    if _stop["signal"] is not None:
        raise KeyboardInterrupt


def cleanup_and_exit(code):
    for f in _cleanup:
        try:
            f()
        except Exception:
            pass
    os._exit(code)


def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="restore-distributed.sh",
        description="Restore a film across Ray workers: the same frames as restore-film.sh (.mkv: bit for bit).",
    )
    ap.add_argument("input", metavar="IN")
    ap.add_argument("output", metavar="OUT", help="OUT.mkv (lossless FFV1) or OUT.mp4 (H.264)")
    ap.add_argument("props", nargs="*", metavar="PROP=VALUE", help="dpirrestore properties, as for restore-film.sh")
    ap.add_argument("--chunk-frames", type=int, default=int(os.environ.get("DPIR_CHUNK_FRAMES", 240)),
                    help="about this many frames per chunk, whole clips (default 240, or $DPIR_CHUNK_FRAMES)")
    ap.add_argument("--workers", type=int, default=int(os.environ.get("DPIR_WORKERS", os.cpu_count() or 1)),
                    help="local Ray only: workers (each loads the model once) (default: the CPU count, or "
                         "$DPIR_WORKERS)")
    ap.add_argument("--cpus-per-task", type=int, default=1, help="Ray CPUs a worker reserves (default 1)")
    ap.add_argument("--gpus-per-task", default="auto",
                    help="0 or 1; auto (default): 1 when the Ray cluster has GPUs and device is not cpu")
    ap.add_argument("--crf", type=int, default=int(os.environ.get("DPIR_X264_CRF", planning.DEFAULT_CRF)),
                    help=f"OUT.mp4: x264's constant quality, 0 (best) to 51 (default {planning.DEFAULT_CRF}, or "
                         "$DPIR_X264_CRF, as restore-film.sh)")
    ap.add_argument("--work-dir", help="where segments are kept between runs (default: OUT.parts); on a cluster, "
                                       "storage every node shares at the same path")
    ap.add_argument("--keep-parts", action="store_true", help="keep the work directory after success")
    ap.add_argument("--retries", type=int, default=3,
                    help="renders again of a chunk whose worker was lost (default 3)")
    ap.add_argument("--connect-timeout", type=float, default=60, help="seconds to wait for RAY_ADDRESS")
    ap.add_argument("--progress-interval", type=float, default=None,
                    help="seconds between progress bars (default 0.5 on a terminal, else 10)")
    args = ap.parse_intermixed_args(argv)
    for p in args.props:
        if "=" not in p or p.startswith("-"):
            raise Fail(f"{p!r} is not a dpirrestore property (PROP=VALUE)")
    if args.chunk_frames < 1 or args.workers < 1 or args.cpus_per_task < 1 or args.retries < 0:
        raise Fail("--chunk-frames, --workers and --cpus-per-task must be at least 1, --retries at least 0")
    if args.gpus_per_task not in ("auto", "0", "1"):
        raise Fail("--gpus-per-task is 0, 1 or auto")
    address = os.environ.get("RAY_ADDRESS", "").strip()
    args.local = not address or address == "local"
    return args


def remove_parts(work, keep_dir=False, only_temp=False):
    """This program's files in the work directory (and the directory, if nothing else is left)."""
    names = os.listdir(work)
    for name in planning.temp_files(names) if only_temp else planning.our_files(names):
        try:
            os.unlink(os.path.join(work, name))
        except FileNotFoundError:
            pass
    if not keep_dir and not os.listdir(work):
        os.rmdir(work)


def main(argv):
    args = parse_args(argv)
    t_start = time.monotonic()
    say = lambda text: print(text, flush=True)  # noqa: E731

    # Arguments, input and output, before anything slow.
    container = os.path.splitext(args.output)[1].lower().lstrip(".")
    kind = planning.segment_kind(container, args.crf)
    from .gst import discover, gst_init, plugin_identity, restorer

    gst_init()
    element = restorer(args.props)
    for prop, bad, why in [
        ("analyse-only", True, "the driver runs the analysis itself"),
        ("qos", True, "it drops frames, so chunks would not match"),
        ("tags-as-prompt", True, "tags are not carried into chunks"),
    ]:
        if element.get_property(prop) == bad:
            raise Fail(f"{prop}={str(bad).lower()} is not supported by restore-distributed.sh: {why}")
    device = str(element.get_property("device")).strip().lower()
    in_path = os.path.abspath(args.input)
    if not os.path.isfile(in_path) or not os.access(in_path, os.R_OK):
        raise Fail(f"cannot read the input file {args.input!r}")
    has_video, has_audio = discover(in_path)
    if not has_video:
        raise Fail(f"{args.input!r} has no video stream")
    out_path = os.path.abspath(args.output)
    out_dir = os.path.dirname(out_path)
    if not os.path.isdir(out_dir):
        raise Fail(f"the output directory {out_dir} does not exist")
    tmp_out = os.path.join(out_dir, f".{os.path.basename(out_path)}.part-{os.getpid()}")
    try:
        open(tmp_out, "wb").close()
    except OSError as e:
        raise Fail(f"cannot write in the output directory {out_dir}: {e.strerror}") from None
    _cleanup.append(lambda: os.path.exists(tmp_out) and os.unlink(tmp_out))
    work = os.path.abspath(args.work_dir or out_path + ".parts")
    try:
        os.makedirs(work, exist_ok=True)
    except OSError as e:
        raise Fail(f"cannot create the work directory {work}: {e.strerror}") from None

    def drop_empty_work_dir():
        if os.path.isdir(work) and not os.listdir(work):
            os.rmdir(work)

    _cleanup.append(drop_empty_work_dir)

    # The job's identity: segments of another input, other properties or another build are stale.
    _, plugin_sha = plugin_identity()
    st = os.stat(in_path)
    key = planning.job_key(in_path, st.st_size, st.st_mtime_ns, args.props, args.chunk_frames, plugin_sha)
    plan_path = os.path.join(work, "plan.json")
    plan = plan_bytes = None
    if os.path.exists(plan_path):
        try:
            with open(plan_path, "rb") as f:
                plan_bytes = f.read()
            old = json.loads(plan_bytes)
            if old.get("key") == key:
                plan = old
        except (OSError, ValueError):
            pass
        if plan is None:
            say(f"{work} holds parts of another job (input, properties or plugin changed): starting over")
            remove_parts(work, keep_dir=True)
    # Files never renamed into place: from a stopped run or a lost worker.
    remove_parts(work, keep_dir=True, only_temp=True)

    # Ray only when there is something to render (a re-run whose chunks are all done just joins);
    # it is reached before the pre-pass, so that a wrong RAY_ADDRESS fails at once.
    ray = resources = None

    def ray_up():
        nonlocal ray, resources
        if ray is None:
            from .cluster import connect_ray

            ray, resources = connect_ray(args, say, cleanup_and_exit)
            _cleanup.insert(0, ray.shutdown)

    resumed = plan is not None
    if plan is None:
        ray_up()
        from .prepass import prepass

        say(f"analysing {args.input} (scene cuts, no model)…")
        pre = prepass(in_path, args.props, say)
        chunks = planning.plan_chunks(len(pre["frames"]), pre["clips"], args.chunk_frames)
        plan = {"key": key, "caps_in": pre["caps_in"], "frames": pre["frames"], "clips": pre["clips"],
                "chunks": chunks}
        plan_bytes = json.dumps(plan).encode()
        planning.write_atomic(plan_path, plan_bytes, str(os.getpid()))
        say(f"pre-pass: {len(pre['frames'])} frames, {len(pre['clips'])} clips in {pre['seconds']:.1f} s")
    chunks = plan["chunks"]
    total = len(plan["frames"])
    longest = max(chunks, key=lambda c: c["frames"])
    if longest["frames"] > 1.5 * args.chunk_frames and len(longest["clips"]) == 1:
        say(f"note: chunk {longest['id'] + 1} is one clip of {longest['frames']} frames (longer than "
            f"--chunk-frames={args.chunk_frames}); set clip-max-frames=N in both scripts to split long clips")

    # Resume: a chunk is done when its record and segment agree.
    done, todo, corrupt = planning.scan(work, chunks, kind)
    from_lossless = False
    if todo and kind["codec"] == "h264":
        # The film's lossless segments, all there (an .mkv rendered with --keep-parts): the .mp4 is
        # encoded from them once rather than rendered again.
        lossless_done, lossless_todo, _ = planning.scan(work, chunks, planning.segment_kind("mkv"))
        if not lossless_todo:
            from_lossless, kind, done, todo, corrupt = True, planning.segment_kind("mkv"), lossless_done, [], []
    for cid in corrupt:
        say(f"chunk {cid + 1}/{len(chunks)}: segment corrupt (checksum), rendering it again")
    for c in todo:
        for name in (planning.segment_file(c["id"], kind), planning.record_file(c["id"], kind)):
            try:
                os.unlink(os.path.join(work, name))
            except FileNotFoundError:
                pass
    frames_before = sum(chunks[i]["frames"] for i in done)
    say(f"{total} frames, {len(plan['clips'])} clips, {len(chunks)} chunks of about {args.chunk_frames} frames, "
        f"{kind['codec'].upper()} segments"
        + (f"; resuming: {len(done)} chunks already done, {len(todo)} to render" if resumed else "")
        + (" (the .mkv's lossless segments: the .mp4 is encoded from them once, here)" if from_lossless else ""))

    from .progress import Progress

    progress = Progress(total, frames_before, args.progress_interval)
    stats = None
    if todo:
        ray_up()
        if args.gpus_per_task == "auto":
            gpus = 1 if resources.get("GPU", 0) > 0 and device != "cpu" else 0
        else:
            gpus = int(args.gpus_per_task)
        job = {"work": work, "plan_id": planning.plan_id(plan_bytes), "input": in_path, "props": args.props,
               "kind": kind, "plugin_sha256": plugin_sha, "gpus": gpus}
        from .cluster import render_chunks

        stats = render_chunks(ray, job, chunks, todo, done, args, gpus, resources, progress, check_interrupted)
        loads = sum(stats["loads"].values())
        per_chunk = [stats["ray_bytes"][c["id"]] for c in todo]
        say(f"model loads: {loads} ({stats['started']} workers; {len(todo)} chunks rendered on "
            f"{len(stats['nodes'])} node{'s' if len(stats['nodes']) != 1 else ''}"
            + (f"; {stats['lost']} worker{'s' if stats['lost'] != 1 else ''} lost and replaced" if stats["lost"] else "")
            + f"); through Ray per chunk: {max(per_chunk)} bytes at most, {sum(per_chunk) // len(per_chunk)} on average")
    check_interrupted()

    out_caps = {done[c["id"]]["out_caps"] for c in chunks}
    if len(out_caps) != 1:
        raise Fail(f"the chunks' segments disagree on their format: {sorted(out_caps)}")
    segments = [{"path": os.path.join(work, planning.segment_file(c["id"], kind)), "first": c["first"],
                 "frames": c["frames"]} for c in chunks]
    from .join import encode_once, join

    if from_lossless:
        say(f"encoding {args.output} once from {len(chunks)} lossless segments (x264 --crf {args.crf})"
            + (" with the source's audio" if has_audio else ""))
        join_s, _ = encode_once(plan, segments, in_path, tmp_out, planning.segment_kind("mp4", args.crf), has_audio,
                                say, out_caps.pop())
        how = f"encoded in {join_s:.2f} s"
    else:
        say(f"joining {len(chunks)} segments into {args.output} (no decoding)"
            + (" with the source's audio" if has_audio else ""))
        delays = [done[c["id"]].get("reorder_depth") for c in chunks]
        join_s, join_bytes = join(plan, segments, in_path, tmp_out, container, kind, has_audio, say,
                                  None if None in delays else max(delays))
        how = f"joined in {join_s:.2f} s ({join_bytes / 1e6:.1f} MB of video)"
    check_interrupted()  # tmp_out is removed by the cleanup: no output
    os.replace(tmp_out, out_path)
    if not args.keep_parts:
        remove_parts(work)
    say(f"done: {args.output}, {total} frames in {len(chunks)} chunks ({len(todo)} rendered, "
        f"{len(chunks) - len(todo)} resumed), {how}, {time.monotonic() - t_start:.1f} s in all")


def entry():
    def on_signal(sig, _frame):
        _stop["signal"] = sig
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    try:
        main(sys.argv[1:])
    except Fail as e:
        print(f"{PROG}: {e}", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished chunks are kept: run the same command again to resume",
              file=sys.stderr, flush=True)
        code = 130
    except Exception:
        import traceback

        # Ray may have replaced sys.stderr by then: write to the file descriptor.
        os.write(2, f"{PROG}: internal error:\n{traceback.format_exc()}".encode())
        code = 2
    finally:
        for f in _cleanup:
            try:
                f()
            except Exception:
                pass
    sys.exit(code)
