"""The driver's join: the segments' encoded frames, demuxed (never decoded), muxed into OUT in order
with the film's own timestamps, beside the source's audio decoded and encoded once."""

import time

from .gst import Gst, audio_encoder, error_text, link_chain, make, muxer, video_encoder
from .plan import Fail, Timeline, presentation_ranks, reorder_depth

# Decode timestamps of a stream with B-frames start before its first presentation timestamp; like
# x264enc, the joined stream is shifted by this much inside a segment that starts there, so
# running times (what the muxer writes) are the film's own.
H264_BASE = 1000 * 3600 * Gst.SECOND
# The caps fields that must agree between segments for their frames to form one stream.
SAME_FIELDS = ("width", "height", "codec_data", "stream-format", "alignment", "profile", "ffvversion", "format",
               "pixel-aspect-ratio")


def caps_signature(caps):
    s = caps.get_structure(0)
    fields = [s.get_name()]
    for f in SAME_FIELDS:
        if s.has_field(f):
            v = s.get_value(f)
            if isinstance(v, Gst.Buffer):
                ok, m = v.map(Gst.MapFlags.READ)
                if ok:
                    data = bytes(m.data).hex()
                    v.unmap(m)
                    v = data
            fields.append(f"{f}={v}")
    return ", ".join(str(x) for x in fields)


def muxable(caps):
    """The demuxer's caps as the muxer takes them: matroskamux's template names FFV1's version
    `ffversion` where avenc_ffv1 and matroskademux say `ffvversion` (GStreamer 1.22)."""
    s = caps.get_structure(0)
    if s.get_name() == "video/x-ffv" and s.has_field("ffvversion") and not s.has_field("ffversion"):
        return Gst.Caps.from_string(f"{caps.to_string()}, ffversion=(int){s.get_value('ffvversion')}")
    return caps


class SegmentReader:
    """The encoded frames of one segment file, in decode order: filesrc ! matroskademux ! appsink
    (with `decoder`, an element factory name, between them: its decoded frames)."""

    def __init__(self, path, decoder=None):
        self.path = path
        self.pipe = Gst.Pipeline.new("segment")
        self.sink = make("appsink", sync=False, max_buffers=8, drop=False, enable_last_sample=False)
        demux = make("matroskademux")
        link_chain(self.pipe, [make("filesrc", location=path), demux])
        tail = [make(decoder), self.sink] if decoder else [self.sink]
        link_chain(self.pipe, tail)
        demux.connect("pad-added", lambda _d, pad: pad.link(tail[0].get_static_pad("sink")))
        self.pipe.set_state(Gst.State.PLAYING)

    def __iter__(self):
        bus = self.pipe.get_bus()
        try:
            while True:
                msg = bus.pop_filtered(Gst.MessageType.ERROR)
                if msg is not None:
                    raise Fail(f"reading segment {self.path}: {error_text(msg)}")
                sample = self.sink.try_pull_sample(200 * Gst.MSECOND)
                if sample is None:
                    if self.sink.is_eos():
                        return
                    continue
                yield sample
        finally:
            self.pipe.set_state(Gst.State.NULL)


def _output(name, tmp_out, container, in_path, has_audio, video):
    """A pipeline `video… ! muxer ! filesink` with, if `has_audio`, the source's audio decoded and
    encoded as restore-film.sh does beside it. `video`: the elements before the muxer."""
    pipe = Gst.Pipeline.new(name)
    mux = muxer(container)
    link_chain(pipe, [mux, make("filesink", location=tmp_out)])
    link_chain(pipe, video)
    # The muxer's video pad by name: linked without caps, a muxer may hand out an audio pad.
    if video[-1].get_static_pad("src").link(mux.request_pad_simple("video_%u")) != Gst.PadLinkReturn.OK:
        raise Fail(f"cannot link the video to {mux.get_factory().get_name()}")
    if has_audio:
        # The chain and its muxer pad exist before the pipeline starts (the muxer waits for both);
        # decodebin stops at audio, so the video stream is not decoded.
        chain = [make("queue", max_size_time=0, max_size_buffers=0, max_size_bytes=0),
                 make("audioconvert"), make("audioresample"), *audio_encoder(container), make("queue")]
        link_chain(pipe, chain)
        if not chain[-1].link(mux):
            raise Fail(f"cannot link the audio encoder to {mux.get_factory().get_name()}")
        src = make("filesrc", location=in_path)
        dec = make("decodebin", caps=Gst.Caps.from_string("audio/x-raw"))
        pipe.add(src)
        pipe.add(dec)
        src.link(dec)
        linked = []

        def pad_added(_d, pad):
            caps = pad.get_current_caps() or pad.query_caps(None)
            if caps.get_structure(0).get_name() == "audio/x-raw" and not linked:
                linked.append(pad)
                pad.link(chain[0].get_static_pad("sink"))
            else:
                sink = make("fakesink", sync=False, **{"async": False})
                pipe.add(sink)
                sink.sync_state_with_parent()
                pad.link(sink.get_static_pad("sink"))

        dec.connect("pad-added", pad_added)
    return pipe


def _finish(pipe, appsrc, tmp_out):
    appsrc.end_of_stream()
    bus = pipe.get_bus()
    while True:
        msg = bus.timed_pop_filtered(Gst.SECOND, Gst.MessageType.EOS | Gst.MessageType.ERROR)
        if msg is None:
            continue
        if msg.type == Gst.MessageType.ERROR:
            raise Fail(f"writing {tmp_out}: {error_text(msg)}")
        return


def join(plan, segments, in_path, tmp_out, container, kind, has_audio, say, delay=None):
    """Mux `segments` ([{path, first, frames}], in film order) into `tmp_out`. `delay`: how many
    frames any segment's encoder reorders at most (from the chunks' records; counted here if not
    given). Returns (seconds, bytes of encoded video joined)."""
    frames = plan["frames"]
    appsrc = make("appsrc", format=Gst.Format.TIME, block=False, handle_segment_change=True)
    pipe = _output("join", tmp_out, container, in_path, has_audio, [appsrc])
    bus = pipe.get_bus()

    def check():
        msg = bus.pop_filtered(Gst.MessageType.ERROR)
        if msg is not None:
            raise Fail(f"writing {tmp_out}: {error_text(msg)}")

    intra = kind["codec"] == "ffv1"
    base = 0 if intra else H264_BASE
    segment = Gst.Segment()
    segment.init(Gst.Format.TIME)
    segment.start = segment.position = base
    segment.time = 0
    caps = signature = timeline = None
    prev_pts = None
    joined_bytes = 0
    t0 = last = time.monotonic()
    try:
        pipe.set_state(Gst.State.PLAYING)
        for seg in segments:
            reader = SegmentReader(seg["path"])
            if intra:
                # Every frame a key frame, in presentation order: the n-th is the chunk's n-th.
                units = ((k, s) for k, s in enumerate(reader))
                ranks = None
            else:
                # Reordered (B-frames): a frame's place is the rank of its timestamp in the segment.
                samples = list(reader)
                ranks = presentation_ranks([s.get_buffer().pts for s in samples])
                units = enumerate(samples)
            got = 0
            for k, sample in units:
                if got >= seg["frames"]:
                    raise Fail(f"segment {seg['path']} holds more frames than its chunk's {seg['frames']}")
                buf = sample.get_buffer()
                if caps is None:
                    caps, signature = muxable(sample.get_caps()), caps_signature(sample.get_caps())
                    if intra:
                        delay = 0
                    elif delay is None:
                        delay = max(reorder_depth(presentation_ranks([s.get_buffer().pts for s in SegmentReader(g["path"])]))
                                    for g in segments)
                    timeline = Timeline(frames, delay, base)
                elif k == 0 and caps_signature(sample.get_caps()) != signature:
                    raise Fail(f"segment {seg['path']} is encoded otherwise than the first "
                               f"({caps_signature(sample.get_caps())} vs {signature}): render it again")
                if k == 0:
                    if buf.has_flags(Gst.BufferFlags.DELTA_UNIT):
                        raise Fail(f"segment {seg['path']} does not start with a key frame")
                    if ranks is not None and reorder_depth(ranks) > timeline.delay:
                        raise Fail(f"segment {seg['path']} reorders frames more than its record says")
                rank = k if ranks is None else ranks[k]
                if intra and k > 0 and buf.pts != Gst.CLOCK_TIME_NONE and buf.pts <= prev_pts:
                    raise Fail(f"segment {seg['path']}: frame timestamps do not increase")
                prev_pts = buf.pts
                try:
                    pts, dts, dur = timeline.next(seg["first"] + rank)
                except ValueError as e:
                    raise Fail(f"segment {seg['path']}: {e}") from None
                out = buf.copy()
                out.pts, out.dts = pts, dts
                out.duration = dur if dur >= 0 else Gst.CLOCK_TIME_NONE
                while appsrc.get_property("current-level-buffers") >= 8:
                    time.sleep(0.002)
                    check()
                if appsrc.push_sample(Gst.Sample.new(out, caps, segment, None)) != Gst.FlowReturn.OK:
                    check()
                    raise Fail(f"writing {tmp_out}: the muxer stopped")
                joined_bytes += out.get_size()
                got += 1
                if time.monotonic() - last > 10:
                    last = time.monotonic()
                    say(f"joining: {timeline.k}/{len(frames)} frames")
            if got != seg["frames"]:
                raise Fail(f"segment {seg['path']} holds {got} frames, its chunk {seg['frames']}")
            check()
        if timeline is None or not timeline.complete():
            raise Fail("the segments do not hold every frame of the film")
        _finish(pipe, appsrc, tmp_out)
    finally:
        pipe.set_state(Gst.State.NULL)
    return time.monotonic() - t0, joined_bytes


def encode_once(plan, segments, in_path, tmp_out, kind, has_audio, say, out_caps):
    """An .mp4 from lossless (FFV1) segments already rendered for the film's .mkv: every segment
    decoded in order, each frame given its original timestamps and the film encoded once with
    restore-film.sh's chain (x264 at `kind`'s quality), as the previous driver did for every output.
    The driver does the encoding alone (at 1080p about as long as the film: see docs/distributed.md),
    but no chunk is rendered again. Returns (seconds, frames)."""
    frames = plan["frames"]
    appsrc = make("appsrc", format=Gst.Format.TIME, block=False)
    out_caps = Gst.Caps.from_string(out_caps)
    # The element's own output caps first, then restore-film.sh's conversion to I420.
    video = [appsrc, make("videoconvert"), make("capsfilter", caps=out_caps), *video_encoder(kind), make("queue")]
    pipe = _output("encode", tmp_out, "mp4", in_path, has_audio, video)
    bus = pipe.get_bus()

    def check():
        msg = bus.pop_filtered(Gst.MessageType.ERROR)
        if msg is not None:
            raise Fail(f"writing {tmp_out}: {error_text(msg)}")

    k = 0
    t0 = last = time.monotonic()
    try:
        pipe.set_state(Gst.State.PLAYING)
        for seg in segments:
            got = 0
            for sample in SegmentReader(seg["path"], decoder="avdec_ffv1"):
                if k == 0:
                    appsrc.set_property("caps", sample.get_caps())
                if got >= seg["frames"]:
                    raise Fail(f"segment {seg['path']} holds more frames than its chunk's {seg['frames']}")
                f = frames[seg["first"] + got]
                buf = sample.get_buffer().copy()
                buf.pts, buf.dts = f["rt"], Gst.CLOCK_TIME_NONE
                buf.duration = f["dur"] if f["dur"] >= 0 else Gst.CLOCK_TIME_NONE
                while appsrc.get_property("current-level-buffers") >= 8:
                    time.sleep(0.005)
                    check()
                if appsrc.push_buffer(buf) != Gst.FlowReturn.OK:
                    check()
                    raise Fail(f"writing {tmp_out}: the encoder stopped")
                got += 1
                k += 1
                if time.monotonic() - last > 10:
                    last = time.monotonic()
                    say(f"encoding: {k}/{len(frames)} frames")
            if got != seg["frames"]:
                raise Fail(f"segment {seg['path']} holds {got} frames, its chunk {seg['frames']}")
            check()
        _finish(pipe, appsrc, tmp_out)
    finally:
        pipe.set_state(Gst.State.NULL)
    return time.monotonic() - t0, k
