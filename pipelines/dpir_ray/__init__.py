"""Restore a film across Ray workers, scene-aligned, bit-identical to one run, resumable.

Run through pipelines/restore-distributed.sh (it picks the Ray virtual environment and puts this
package on PYTHONPATH):

    pipelines/restore-distributed.sh IN OUT.mkv|OUT.mp4 [dpirrestore properties…] [options]

1. Pre-pass (prepass.py, in the driver): the film decoded exactly as pipelines/restore-film.sh
   decodes it, through `dpirrestore analyse-only=true`: the element's own scene detector finds the
   clips (no model is loaded); every frame's timestamps and a CRC of its pixels are recorded.
2. Plan (plan.py, pure Python): clips grouped into chunks of about --chunk-frames frames, written
   to the work directory as plan.json. Resume: a chunk whose record and segment agree is done.
3. Workers (worker.py): one Ray actor per task slot (per GPU with GPUs) loads the model once and
   renders chunk after chunk: it seeks to the chunk, checks every frame against the pre-pass CRC,
   restores it and encodes it in OUT's codec (FFV1 for .mkv, H.264 starting with an IDR frame for
   .mp4), writing the segment into the work directory (shared storage on a cluster) under a
   temporary name renamed when complete, with its SHA-256. Only the chunk's number and its
   record (path, checksums, timings) travel through Ray.
4. Join (join.py, in the driver): the segments' encoded frames, demuxed and never decoded, are
   muxed into OUT in order with every frame's original timestamps, beside the source's audio
   (encoded once); OUT is written under a temporary name and renamed at the end.

Modules: plan and progress are pure Python (unit-tested without GStreamer or Ray: tests/python);
gst holds the GStreamer helpers; cluster the Ray connection and the actor pool; cli the command.
"""
