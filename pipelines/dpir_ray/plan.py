"""Planning, resume and the join's timeline: plain Python (no GStreamer, no Ray), so that it can be
imported and unit-tested anywhere (tests/python/test_plan.py)."""

import hashlib
import json
import os
import re

# plan.json's layout; another version in a work directory is another job's.
PLAN_VERSION = 2
# x264 settings shared with pipelines/restore-film.sh's .mp4 (keep both in step); the rate control
# is constant quality (CRF): each chunk gets the quality the whole film would, whatever its
# neighbours, which a bitrate target per chunk would not give.
X264_OPTIONS = {"speed-preset": "medium", "psy-tune": "film", "pass": "qual"}
DEFAULT_CRF = 18


class Fail(Exception):
    """An error for the user: printed as one line, no traceback."""


# ---- chunks ---------------------------------------------------------------------------------


def plan_chunks(n_frames, clips, chunk_frames):
    """Group clips (dicts with `index` and first `frame`, ascending, the first at frame 0) into
    chunks of about `chunk_frames` frames: a chunk takes the next clip while that leaves it nearer
    to `chunk_frames` than stopping would. A clip is never split."""
    if n_frames < 1 or not clips or clips[0]["frame"] != 0:
        raise ValueError("a plan needs frames and a first clip at frame 0")
    if any(b["frame"] <= a["frame"] for a, b in zip(clips, clips[1:])) or clips[-1]["frame"] >= n_frames:
        raise ValueError("clips must start at increasing frames inside the film")
    starts = [c["frame"] for c in clips] + [n_frames]
    chunks, i = [], 0
    while i < len(clips):
        j = i + 1
        while j < len(clips):
            size, grown = starts[j] - starts[i], starts[j + 1] - starts[i]
            if abs(grown - chunk_frames) < abs(size - chunk_frames):
                j += 1
            else:
                break
        chunks.append(
            {
                "id": len(chunks),
                "first": starts[i],
                "frames": starts[j] - starts[i],
                "first_clip": clips[i]["index"],
                "clips": [dict(c, frame=c["frame"] - starts[i]) for c in clips[i:j]],
            }
        )
        i = j
    return chunks


def job_key(in_path, size, mtime_ns, props, chunk_frames, plugin_sha256):
    """What makes segments reusable: the same input file, properties, chunking and plugin build."""
    return {"version": PLAN_VERSION, "input": in_path, "size": size, "mtime_ns": mtime_ns,
            "props": list(props), "chunk_frames": chunk_frames, "plugin_sha256": plugin_sha256}


def plan_id(plan_bytes):
    """Names one plan.json: workers check that they read the driver's (shared storage)."""
    return hashlib.sha256(plan_bytes).hexdigest()[:16]


# ---- segments and records -------------------------------------------------------------------


def segment_kind(container, crf=DEFAULT_CRF):
    """What a chunk's segment holds for OUT's container: FFV1 (lossless) for .mkv, H.264 for .mp4,
    both in Matroska (MP4's edit lists can make a demuxer drop a segment's first frames when its
    timestamps do not start at zero; Matroska returns every frame). Segments of another kind (or
    CRF) are other files: a work directory can hold both, sharing its plan."""
    if container == "mkv":
        return {"codec": "ffv1", "name": "ffv1", "ext": "mkv"}
    if container == "mp4":
        if not 0 <= crf <= 51:
            raise Fail(f"--crf {crf}: x264's constant quality goes from 0 (best) to 51")
        return {"codec": "h264", "name": f"h264-crf{crf:g}", "ext": "mkv", "crf": crf, "x264": X264_OPTIONS}
    raise Fail(f"OUT must end in .mkv (lossless FFV1) or .mp4 (H.264): .{container}")


def segment_file(cid, kind):
    return f"chunk-{cid:05d}.{kind['name']}.{kind['ext']}"


def record_file(cid, kind):
    return f"chunk-{cid:05d}.{kind['name']}.json"


def temp_file(final, token):
    """The name a file is written under before its atomic rename to `final` (same directory)."""
    return f"{final}.tmp-{token}"


_OURS = re.compile(r"(plan\.json|chunk-\d{5,}\.[\w.-]+?\.(mkv|mp4|json))(\.tmp-[\w-]+)?")
_TEMP = re.compile(r".+\.tmp-[\w-]+")


def our_files(names):
    """The names this program writes in a work directory (anything else there is left alone)."""
    return [n for n in names if _OURS.fullmatch(n)]


def write_atomic(path, data, token):
    """`data` into `path` through a temporary name and a rename: readers see all of it or nothing."""
    tmp = temp_file(path, token)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise Fail(f"cannot write {path}: {e.strerror}") from None


def temp_files(names):
    """Files of ours that were never renamed: written by a run or a worker that was stopped."""
    return [n for n in our_files(names) if _TEMP.fullmatch(n)]


def make_record(chunk, kind, **facts):
    """The record a worker writes beside a finished segment: the chunk it holds and its checksums."""
    rec = {"id": chunk["id"], "first": chunk["first"], "frames": chunk["frames"], "kind": kind}
    rec.update(facts)
    for field in ("segment", "size", "sha256", "stream_sha256"):
        if field not in rec:
            raise ValueError(f"a chunk record needs {field}")
    return rec


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def scan(work, chunks, kind, checksum=sha256_file):
    """Which chunks are done in `work`: (done {id: record}, todo [chunk], corrupt [id]). A chunk is
    done when its record names this chunk and kind and its segment has the recorded size and
    SHA-256; a record whose segment does not is `corrupt` (and the chunk is to do)."""
    done, todo, corrupt = {}, [], []
    for c in chunks:
        try:
            with open(os.path.join(work, record_file(c["id"], kind))) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            todo.append(c)
            continue
        if not isinstance(rec, dict) or (rec.get("id"), rec.get("first"), rec.get("frames"), rec.get("kind")) != (
            c["id"], c["first"], c["frames"], kind
        ):
            todo.append(c)
            continue
        seg = os.path.join(work, segment_file(c["id"], kind))
        try:
            ok = os.path.getsize(seg) == rec.get("size") and checksum(seg) == rec.get("sha256")
        except OSError:
            ok = False
        if ok:
            done[c["id"]] = rec
        else:
            corrupt.append(c["id"])
            todo.append(c)
    return done, todo, corrupt


# ---- scheduling -------------------------------------------------------------------------------


def actor_slots(resources, cpus_per_task, gpus_per_task):
    """How many workers a cluster holds at once: its CPUs divided by --cpus-per-task, and at most
    one per GPU when workers take a GPU."""
    cpu_slots = int(resources.get("CPU", 0) // cpus_per_task)
    if gpus_per_task:
        return min(cpu_slots, int(resources.get("GPU", 0) // gpus_per_task))
    return cpu_slots


# ---- the join's timeline --------------------------------------------------------------------


def presentation_ranks(pts):
    """The position in presentation order of each encoded frame of a segment, given in decode
    order with its container timestamps (only their order is used)."""
    order = sorted(range(len(pts)), key=lambda k: pts[k])
    ranks = [0] * len(pts)
    for rank, k in enumerate(order):
        ranks[k] = rank
    if any(pts[a] == pts[b] for a, b in zip(order, order[1:])):
        raise ValueError("two frames of a segment share a timestamp")
    return ranks


def reorder_depth(ranks):
    """How many frames an encoded frame can come before its turn (0 without B-frames)."""
    return max([k - q for k, q in enumerate(ranks)] + [0])


class Timeline:
    """Timestamps for the joined film. The encoded frames arrive in decode order, segment after
    segment; each is given its source frame's presentation timestamp (`rt`, the running time in
    the single run) and a decode timestamp `delay` frames earlier in the film's own timeline (as
    x264 does), so that decode timestamps rise across segment joins and never pass presentation.
    Decode timestamps of the first `delay` frames fall before the film's start: `base` is added
    to every timestamp (the muxer receives a segment starting at `base`)."""

    def __init__(self, frames, delay, base):
        self.rt = [f["rt"] for f in frames]
        self.dur = [f["dur"] for f in frames]
        self.delay, self.base = delay, base
        step = self.dur[0] if self.dur[0] > 0 else (self.rt[1] - self.rt[0] if len(self.rt) > 1 else 1)
        span = self.rt[delay] - self.rt[0] if delay < len(self.rt) else delay * step
        if span > base + self.rt[0]:
            raise ValueError("base leaves no room for the first decode timestamps")
        self.step = step
        self.k = 0  # encoded frames given so far (decode order)
        self.seen = [False] * len(frames)

    def next(self, frame):
        """(pts, dts, duration or -1) for the next encoded frame, which shows source frame `frame`."""
        if not 0 <= frame < len(self.rt) or self.seen[frame]:
            raise ValueError(f"frame {frame} is not in the film or came twice")
        if self.k - frame > self.delay:
            raise ValueError(f"frame {frame} is decoded {self.k - frame} frames early: more than the delay {self.delay}")
        self.seen[frame] = True
        k, self.k = self.k, self.k + 1
        if k >= self.delay:
            dts = self.rt[k - self.delay]
        elif self.delay < len(self.rt):
            # As x264 starts: the first frames' own times, less the delay's span of the film.
            dts = self.rt[k] - (self.rt[self.delay] - self.rt[0])
        else:
            dts = self.rt[0] - (self.delay - k) * self.step
        return self.base + self.rt[frame], self.base + dts, self.dur[frame]

    def complete(self):
        return self.k == len(self.rt) and all(self.seen)
