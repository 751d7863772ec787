"""The worker: a Ray actor that holds one restoring pipeline (and so one loaded model) and renders
chunk after chunk into segments in the work directory. This module is imported by name inside the
worker process (the driver ships the package with the job), so nothing of GStreamer is pickled."""

import hashlib
import json
import os
import socket
import time

from .gst import (Gst, decode_head, error_text, frame_crc, gst_init, make, plugin_identity, restorer, video_encoder,
                  wait_state)
from .plan import (Fail, make_record, plan_id, presentation_ranks, record_file, reorder_depth, segment_file,
                   temp_file, write_atomic)


def fsync_path(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ChunkWorker:
    """One per task slot. `start()` checks this node against the job and loads the model (the
    element goes to PAUSED once, then stays in READY: dpirrestore keeps its engine between READY
    and PAUSED as long as its engine settings do not change); `render()` runs one chunk.

    `job`: work (the shared work directory), plan_id, input, props, kind (plan.segment_kind),
    plugin_sha256, gpus (1: this actor holds a GPU)."""

    def __init__(self, job):
        self.job = job
        self.pipe = None
        self.loads = 0
        self.chunks_done = 0

    # ---- set-up ------------------------------------------------------------------------------

    def start(self, log):
        """Check this node against the job, build the pipeline, load the model. Returns who this
        worker is (pid, host, node) and its model loads so far."""
        import ray

        self.log = log
        job = self.job
        self.host = socket.gethostname()
        self.node = ray.get_runtime_context().get_node_id()
        self.where = f"{self.host}, node {self.node[:8]}"
        gst_init()
        _, sha = plugin_identity()
        if sha != job["plugin_sha256"]:
            raise Fail(
                f"the worker on {self.where} loads another build of libgstdpir.so than the driver (sha256 "
                f"{sha[:12]}… vs {job['plugin_sha256'][:12]}…): install the same build on every node"
            )
        work = job["work"]
        plan_path = os.path.join(work, "plan.json")
        try:
            with open(plan_path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise Fail(
                f"the worker on {self.where} cannot read {plan_path} ({e.strerror}): the work directory must be "
                "on storage every node shares, at the same path (like IN); see --work-dir"
            ) from None
        if plan_id(data) != job["plan_id"]:
            raise Fail(
                f"the worker on {self.where} reads another {plan_path} than the driver wrote: the work directory "
                "must be the same shared directory on every node"
            )
        plan = json.loads(data)
        self.frames, self.chunks, self.caps_in = plan["frames"], plan["chunks"], plan["caps_in"]
        if not os.access(job["input"], os.R_OK):
            raise Fail(f"the worker on {self.where} cannot read the input {job['input']}: IN must be on storage "
                       "every node shares, at the same path")
        probe = os.path.join(work, temp_file("plan.json", f"probe-{os.getpid()}"))
        try:
            open(probe, "wb").close()
            os.unlink(probe)
        except OSError as e:
            raise Fail(f"the worker on {self.where} cannot write in the work directory {work}: {e.strerror}") from None
        self._build()
        return {"pid": os.getpid(), "host": self.host, "node": self.node, "where": self.where, "loads": self.loads}

    def _build(self):
        job = self.job
        extra = []
        if job["gpus"]:
            import ray

            ids = [str(int(i)) for i in ray.get_gpu_ids()]
            visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
            gpu = visible.index(ids[0]) if ids and ids[0] in visible else (int(ids[0]) if ids else 0)
            extra.append(f"device=cuda:{gpu}")
        # appsrc ! dpirrestore ! queue ! <OUT's encoder> ! matroskamux ! filesink: the queue gives
        # the encoder its own thread, as in restore-film.sh.
        self.pipe = Gst.Pipeline.new("chunk")
        self.appsrc = make("appsrc", caps=Gst.Caps.from_string(self.caps_in), format=Gst.Format.TIME, block=False)
        self.restore = restorer(job["props"], extra)
        self.sink = make("filesink", location=os.devnull)
        encoder = video_encoder(job["kind"])
        link_all = [self.appsrc, self.restore, make("queue"), *encoder, make("matroskamux"), self.sink]
        for e in link_all:
            self.pipe.add(e)
        for a, b in zip(link_all, link_all[1:]):
            if not a.link(b):
                raise Fail(f"cannot link {a.get_name()} to {b.get_name()}")
        self.state = {"restored": 0, "out_caps": None, "clips": [], "failure": [], "hash": None, "units": 0,
                      "first_key": None, "pts": []}
        st = self.state

        def count_restored(pad, info):
            st["restored"] += 1
            if st["out_caps"] is None:
                st["out_caps"] = pad.get_current_caps().to_string()
            return Gst.PadProbeReturn.OK

        def hash_stream(pad, info):
            buf = info.get_buffer()
            ok, m = buf.map(Gst.MapFlags.READ)
            if ok:
                st["hash"].update(m.data)
                buf.unmap(m)
            if st["units"] == 0:
                st["first_key"] = not buf.has_flags(Gst.BufferFlags.DELTA_UNIT)
            st["units"] += 1
            st["pts"].append(buf.pts)
            return Gst.PadProbeReturn.OK

        self.restore.get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, count_restored)
        encoder[-1].get_static_pad("src").add_probe(Gst.PadProbeType.BUFFER, hash_stream)
        bus = self.pipe.get_bus()
        bus.enable_sync_message_emission()

        def on_sync(_bus, msg):
            if msg.type == Gst.MessageType.ERROR:
                st["failure"].append(error_text(msg))
            elif msg.type == Gst.MessageType.PROGRESS:
                kind, code, _text = msg.parse_progress()
                if code == "load-model" and kind == Gst.ProgressType.COMPLETE:
                    self.loads += 1
            elif msg.type == Gst.MessageType.ELEMENT:
                s = msg.get_structure()
                if s is not None and s.get_name() == "dpir-clip":
                    st["clips"].append(
                        {"index": s.get_value("index"), "frame": s.get_value("frame-index"),
                         "reason": s.get_string("reason")}
                    )

        bus.connect("sync-message", on_sync)
        # The model loads when the element goes to PAUSED; back in READY it keeps it. The element
        # alone: with the pipeline, appsrc would start pushing caps into a chain that is going back
        # down, and the element would report that negotiation as failed.
        self.pipe.set_state(Gst.State.READY)
        ret = self.restore.set_state(Gst.State.PAUSED)
        failed = ret == Gst.StateChangeReturn.FAILURE or st["failure"]
        self.restore.set_state(Gst.State.READY)
        self._rest()
        if failed:
            raise Fail(f"the worker on {self.where} cannot start dpirrestore {' '.join(job['props'])}: "
                       f"{'; '.join(st['failure']) or 'state change failed'}")

    def _rest(self):
        """Between chunks: READY, not NULL, so that the element keeps its model; the file sink alone
        goes to NULL, which closes its file (in READY it stays open)."""
        self.pipe.set_state(Gst.State.READY)
        self.sink.set_state(Gst.State.NULL)

    # ---- one chunk -----------------------------------------------------------------------------

    def render(self, cid, token):
        """Render chunk `cid` into its segment in the work directory; returns its record."""
        job, c = self.job, self.chunks[cid]
        me = f"chunk {cid + 1}/{len(self.chunks)}"
        self.log.push.remote(("start", cid, token, os.getpid(), self.where))
        t0 = time.monotonic()
        kind, work = job["kind"], job["work"]
        final = os.path.join(work, segment_file(cid, kind))
        tmp = temp_file(final, token)
        try:
            stream_sha = self._render_into(c, me, cid, token, tmp)
            fsync_path(tmp)
            size = os.path.getsize(tmp)
            h = hashlib.sha256()
            with open(tmp, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            os.replace(tmp, final)
            fsync_path(work, directory=True)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        self.chunks_done += 1
        rec = make_record(
            c, kind, segment=os.path.basename(final), size=size, sha256=h.hexdigest(), stream_sha256=stream_sha,
            out_caps=self.state["out_caps"], reorder_depth=reorder_depth(presentation_ranks(self.state["pts"])),
            seconds=time.monotonic() - t0, pid=os.getpid(), host=self.host,
            node=self.node, where=self.where, loads=self.loads, chunks_by_worker=self.chunks_done,
        )
        write_atomic(os.path.join(work, record_file(cid, kind)), json.dumps(rec).encode(), token)
        return rec

    def _render_into(self, c, me, cid, token, location):
        st = self.state
        st.update(restored=0, out_caps=None, clips=[], failure=[], hash=hashlib.sha256(), units=0, first_key=None,
                  pts=[])
        n = c["frames"]
        frames = self.frames[c["first"]:c["first"] + n]
        caps_in = Gst.Caps.from_string(self.caps_in)
        self.sink.set_property("location", location)
        self.restore.set_property("first-clip-index", c["first_clip"])
        ebus = self.pipe.get_bus()
        ebus.set_flushing(True)  # messages of the chunk before
        ebus.set_flushing(False)

        # Decoder: the restore-film.sh chain up to the element, ending in an appsink with the caps
        # the element had in the pre-pass (the same conversion, hence the same bytes).
        dec = Gst.Pipeline.new("decode")
        appsink = make("appsink", caps=caps_in, sync=False, max_buffers=8, drop=False, enable_last_sample=False)
        decode_head(dec, self.job["input"], lambda: [make("queue", max_size_buffers=4), make("videoconvert"), appsink])
        last_report = [0.0]

        def report(force=False):
            now = time.monotonic()
            if force or now - last_report[0] > 0.5:
                last_report[0] = now
                self.log.push.remote(("progress", cid, token, st["restored"]))

        seek = self.frames[c["first"] - 1]["st"] if c["first"] > 0 else None
        try:
            if self.pipe.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE or st["failure"]:
                raise RuntimeError(f"{me}: the restoring pipeline does not start: "
                                   f"{'; '.join(st['failure']) or 'state change failed'}")
            dec.set_state(Gst.State.PAUSED)
            wait_state(dec, f"{me}: decoding {self.job['input']}")
            if seek is not None:
                # To the frame before the chunk: a decoder clips a frame that straddles the segment
                # start and stamps it with that start, which would then look like the chunk's first
                # frame (container timestamps are rounded: Matroska's to the millisecond).
                ok = dec.seek(1.0, Gst.Format.TIME, Gst.SeekFlags.FLUSH | Gst.SeekFlags.ACCURATE, Gst.SeekType.SET,
                              seek, Gst.SeekType.NONE, -1)
                if not ok:
                    raise RuntimeError(f"{me}: {self.job['input']} refused the seek to frame {c['first']}")
                wait_state(dec, f"{me}: seeking to frame {c['first']}")
            dec.set_state(Gst.State.PLAYING)
            dbus = dec.get_bus()
            pushed = 0
            while pushed < n:
                if st["failure"]:
                    raise RuntimeError(f"{me}: {st['failure'][0]}")
                msg = dbus.pop_filtered(Gst.MessageType.ERROR)
                if msg is not None:
                    raise RuntimeError(f"{me}: decoding: {error_text(msg)}")
                sample = appsink.try_pull_sample(200 * Gst.MSECOND)
                report()
                if sample is None:
                    if appsink.is_eos():
                        raise RuntimeError(f"{me}: the input ended after {pushed} of the chunk's {n} frames")
                    continue
                buf = sample.get_buffer()
                want = frames[pushed]
                if buf.pts < want["pts"]:
                    continue  # before the chunk (decoded from the keyframe), or the preroll again
                if buf.pts > want["pts"]:
                    raise RuntimeError(
                        f"{me}: after the seek the decoder skipped frame {c['first'] + pushed} "
                        f"(pts {want['pts']}, got {buf.pts}): this input is not frame-exact when sought"
                    )
                if frame_crc(buf, sample.get_caps()) != want["crc"]:
                    raise RuntimeError(
                        f"{me}: frame {c['first'] + pushed} decodes differently after a seek than in one pass: "
                        "this input cannot be rendered in chunks bit-identically"
                    )
                # The film's own running times: the encoder sees the timeline the single run has.
                out = buf.copy()
                out.pts = want["rt"]
                out.dts = Gst.CLOCK_TIME_NONE
                out.duration = want["dur"] if want["dur"] >= 0 else Gst.CLOCK_TIME_NONE
                while self.appsrc.get_property("current-level-buffers") >= 4 and not st["failure"]:
                    time.sleep(0.005)
                    report()
                self.appsrc.push_buffer(out)
                pushed += 1
            dec.set_state(Gst.State.NULL)
            self.appsrc.end_of_stream()
            while True:
                msg = ebus.timed_pop_filtered(200 * Gst.MSECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR)
                report()
                if st["failure"]:
                    raise RuntimeError(f"{me}: {st['failure'][0]}")
                if msg is not None and msg.type == Gst.MessageType.EOS:
                    break
        finally:
            dec.set_state(Gst.State.NULL)
            self._rest()
        if st["restored"] != n:
            raise RuntimeError(f"{me}: the element gave {st['restored']} frames for the chunk's {n}")
        if st["units"] != n:
            raise RuntimeError(f"{me}: the encoder gave {st['units']} frames for the chunk's {n}")
        if not st["first_key"]:
            raise RuntimeError(f"{me}: the segment does not start with a key frame")
        # The chunk's first clip starts the element's stream ("start"); the others must be the
        # pre-pass's own cuts.
        expected = [dict(k, reason="start") if i == 0 else k for i, k in enumerate(c["clips"])]
        if st["clips"] != expected:
            raise RuntimeError(f"{me}: the element found the clips {st['clips']}, the pre-pass {expected}")
        report(force=True)
        return st["hash"].hexdigest()
