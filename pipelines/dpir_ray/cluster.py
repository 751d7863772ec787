"""Ray: the connection (a private local instance, or a cluster through RAY_ADDRESS) and the pool of
stateful workers that renders the chunks."""

import collections
import logging
import os
import pickle
import re
import socket
import sys
import threading
import time
import uuid

from .plan import Fail, actor_slots, segment_file, temp_file
from .progress import EventLog

PROG = "restore-distributed"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# What the workers need of the driver's environment (the plugin above all). Ray starts them with it.
WORKER_ENV = ("GST_PLUGIN_PATH", "GST_DEBUG", "RAYON_NUM_THREADS", "DPIR_CPU_OPS")
# Nothing large goes through Ray (segments go to the work directory): a small object store will do.
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024


def connect_ray(args, say, on_timeout):
    """Ray with this package shipped to the workers (imported there by name) and the driver's
    GStreamer environment. Returns (ray, cluster resources)."""
    import ray

    runtime_env = {
        "py_modules": [PACKAGE_DIR],
        "excludes": ["__pycache__"],
        "env_vars": {k: os.environ[k] for k in WORKER_ENV if k in os.environ},
    }
    address = os.environ.get("RAY_ADDRESS", "").strip()
    kw = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True, runtime_env=runtime_env)
    if address and address != "local":
        if address != "auto":
            m = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?(?::(\d+))?/?", address)
            if not m:
                raise Fail(f"RAY_ADDRESS={address} is not host:port, ray://host:port, auto or local")
            host = m.group(1)
            port = int(m.group(2) or (10001 if address.startswith("ray://") else 6379))
            try:
                socket.create_connection((host, port), timeout=5).close()
            except OSError as e:
                raise Fail(
                    f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({host}:{port}: "
                    f"{e.strerror or e}): is `ray start --head` running there? Unset RAY_ADDRESS for a local Ray"
                ) from None
        done = threading.Event()

        def watchdog():
            if not done.wait(args.connect_timeout):
                print(f"{PROG}: the Ray cluster at RAY_ADDRESS={address} did not answer in "
                      f"{args.connect_timeout} s", file=sys.stderr, flush=True)
                on_timeout(1)

        threading.Thread(target=watchdog, daemon=True).start()
        try:
            ray.init(address=address, **kw)
        except ConnectionError as e:
            raise Fail(f"cannot connect to the Ray cluster at RAY_ADDRESS={address}: {e}") from None
        finally:
            done.set()
        res = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        say(f"Ray cluster at {address}: {len(nodes)} nodes, {int(res.get('CPU', 0))} CPUs, "
            f"{int(res.get('GPU', 0))} GPUs")
    else:
        ray.init(address="local", num_cpus=args.workers * args.cpus_per_task,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, **kw)
        res = ray.cluster_resources()
        say(f"local Ray: {args.workers} workers ({int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs)")
    return ray, res


def _size(obj):
    return len(pickle.dumps(obj, protocol=5))


def render_chunks(ray, job, chunks, todo, done, args, gpus, resources, progress, interrupted):
    """Render the chunks `todo` on a pool of ChunkWorker actors (one per task slot), recording
    each finished chunk in `done`. A worker lost mid-chunk (killed, its node gone) is replaced and
    its chunk rendered again, up to --retries times per chunk. Returns the run's statistics."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .worker import ChunkWorker  # by name: the worker process imports it from the shipped package

    # Locally the resources are --workers × --cpus-per-task CPUs (and the machine's GPUs).
    slots = min(len(todo), actor_slots(resources, args.cpus_per_task, gpus))
    if slots < 1:
        need = f"{gpus} GPU" if gpus else f"{args.cpus_per_task} CPUs"
        raise Fail(f"the Ray cluster has no room for one worker ({need} each): see --cpus-per-task/--gpus-per-task")
    # Workers report to an actor on the driver's node (it must outlive any worker node).
    log_opts = {"num_cpus": 0}
    try:
        log_opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=True)
    except Exception:
        pass
    log = ray.remote(EventLog).options(**log_opts).remote()
    worker_cls = ray.remote(ChunkWorker).options(num_cpus=args.cpus_per_task, num_gpus=gpus, max_restarts=0)
    n = len(chunks)
    stats = {"actors": 0, "started": 0, "lost": 0, "loads": {}, "ray_bytes": collections.Counter(), "nodes": {}}
    starting, idle, inflight = {}, collections.deque(), {}
    queue = collections.deque(todo)
    attempts, tokens, dispatched = {}, {}, collections.Counter()
    lost_at_start = 0

    def new_actor():
        a = worker_cls.remote(job)
        stats["actors"] += 1
        starting[a.start.remote(log)] = a

    def account(cid, obj):
        stats["ray_bytes"][cid] += _size(obj)

    for _ in range(slots):
        new_actor()
    progress.t0 = time.monotonic()
    waiting_since = time.monotonic()
    try:
        while queue or inflight:
            interrupted()
            while idle and queue:
                a = idle.popleft()
                c = queue.popleft()
                token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
                tokens[c["id"]] = token
                dispatched[c["id"]] += 1
                account(c["id"], (c["id"], token))
                inflight[a.render.remote(c["id"], token)] = (a, c)
            refs = list(inflight) + list(starting)
            ready = ray.wait(refs, num_returns=1, timeout=0.5)[0] if refs else []
            for ev in ray.get(log.drain.remote()):
                kind, cid, token = ev[0], ev[1], ev[2]
                account(cid, ev)
                if cid in done or tokens.get(cid) != token:
                    continue  # a report that arrived after the result, or of a lost attempt
                c = chunks[cid]
                if kind == "start":
                    attempts[cid] = attempts.get(cid, 0) + 1
                    progress.running[cid] = (token, 0)
                    what = "started" if attempts[cid] == 1 else \
                        f"restarted (attempt {attempts[cid]}: its worker was lost)"
                    progress.line(f"chunk {cid + 1}/{n}: {what}, frames {c['first']}-{c['first'] + c['frames'] - 1}"
                                  f" (pid {ev[3]} on {ev[4]})")
                elif kind == "progress" and cid in progress.running:
                    progress.running[cid] = (token, ev[3])
            for ref in ready:
                if ref in starting:
                    a = starting.pop(ref)
                    try:
                        info = ray.get(ref)
                    except RayTaskError as e:
                        raise Fail(_cause(e)) from None
                    except RayActorError as e:
                        lost_at_start += 1
                        stats["lost"] += 1
                        if lost_at_start > args.retries * slots:
                            raise Fail(f"workers keep dying while they start ({lost_at_start} lost): "
                                       f"{_first_line(e)}") from None
                        progress.line(f"a worker was lost while it started ({_first_line(e)}): starting another")
                        new_actor()
                        continue
                    stats["started"] += 1
                    stats["loads"][info["pid"], info["node"]] = info["loads"]
                    idle.append(a)
                    continue
                a, c = inflight.pop(ref)
                cid = c["id"]
                try:
                    rec = ray.get(ref)
                except RayTaskError as e:
                    raise Fail(_cause(e)) from None
                except RayActorError as e:
                    stats["lost"] += 1
                    progress.running.pop(cid, None)
                    tmp = os.path.join(job["work"], temp_file(segment_file(cid, job["kind"]), tokens[cid]))
                    try:
                        os.unlink(tmp)  # the lost worker's half-written segment
                    except OSError:
                        pass
                    tries = dispatched[cid]
                    if tries > args.retries:
                        raise Fail(f"chunk {cid + 1}/{n} failed: its worker was lost {tries} times "
                                   f"(--retries {args.retries}): {_first_line(e)}") from None
                    progress.line(f"chunk {cid + 1}/{n}: its worker was lost ({_first_line(e)}): rendering it again")
                    queue.appendleft(c)
                    ray.kill(a, no_restart=True)
                    new_actor()
                    continue
                account(cid, rec)
                done[cid] = rec
                stats["loads"][rec["pid"], rec["node"]] = rec["loads"]
                stats["nodes"][rec["node"]] = stats["nodes"].get(rec["node"], 0) + 1
                progress.running.pop(cid, None)
                progress.finished += c["frames"]
                progress.line(f"chunk {cid + 1}/{n} done: frames {c['first']}-{c['first'] + c['frames'] - 1} "
                              f"({c['frames']} frames, clips {c['first_clip']}-{c['first_clip'] + len(c['clips']) - 1}) "
                              f"in {rec['seconds']:.1f} s, {c['frames'] / max(rec['seconds'], 1e-9):.2f} frames/s "
                              f"(pid {rec['pid']} on {rec['where']})")
                idle.append(a)
            if inflight or idle or not queue:
                waiting_since = time.monotonic()
            elif time.monotonic() - waiting_since > 60:
                waiting_since = time.monotonic()
                progress.line(f"waiting for the Ray cluster to have room for a worker ({len(starting)} waiting to "
                              f"start, {len(queue)} chunks to render)")
            progress.draw()
        progress.close()
    finally:
        for a in list(idle) + list(starting.values()) + [a for a, _ in inflight.values()]:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        try:
            ray.kill(log, no_restart=True)
        except Exception:
            pass
    return stats


def _cause(e):
    cause = getattr(e, "cause", None)
    return str(cause) if cause is not None else str(e).strip().splitlines()[-1]


def _first_line(e):
    """Why Ray says an actor is gone, in a few words."""
    text = str(e)
    if "node has died" in text or "node died" in text or "its node" in text:
        return "its node died"
    if "worker process has died" in text or "Worker unexpectedly exits" in text:
        return "its process died"
    if "killed" in text:
        return "it was killed"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]
