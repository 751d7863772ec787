#!/usr/bin/env python3
"""Run a command and report the peak GPU memory in use while it ran (device-wide, minus what was
in use before it started: the process's CUDA context, caching allocator and all), sampled every
5 ms through NVML. The same figure for the candle binary and for PyTorch, which the binary can't
report itself. Without NVML or a GPU (the CPU check of run.sh) it just runs the command.

    python3 tests/gpu/peakmem.py -- CMD ARGS...

A line `PEAKMEM RESET` from the command (not echoed) restarts the peak there, so that start-up
transients don't count. Prints `PEAK gpu_mem_gib=X` (or `PEAK gpu_mem_gib=nan`) after the command's output and exits with
the command's status.
"""
import subprocess
import sys
import threading
import time


def main():
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    handle = None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        used = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
        base = used()
    except Exception as e:  # no NVML / no GPU: CPU check
        print(f"peakmem: no NVML ({e.__class__.__name__}: {e}); GPU memory not sampled", file=sys.stderr)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], used() - base)
            time.sleep(0.005)

    if handle is not None:
        th = threading.Thread(target=sample, daemon=True)
        th.start()
    # A child line `PEAKMEM RESET` starts the measured phase: the peak before it (start-up, weights
    # made in f32 then cast) is forgotten; the baseline stays the memory in use before the launch.
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, bufsize=1)
    for line in child.stdout:
        if line.strip() == "PEAKMEM RESET":
            peak[0] = 0
            continue
        sys.stdout.write(line)
        sys.stdout.flush()
    rc = child.wait()
    done.set()
    if handle is not None:
        th.join()
        print(f"PEAK gpu_mem_gib={peak[0] / 2**30:.3f}", flush=True)
    else:
        print("PEAK gpu_mem_gib=nan", flush=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
