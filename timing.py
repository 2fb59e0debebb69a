"""Timing and peak memory, measured so that a busy, shared machine does not fool the numbers.

Time: the median of `repeats` runs after warm-up runs, with the GPU synchronised around each run;
a fast path and the slow alternative it is compared with run in turn (measure_interleaved), so
that a slow spell of the machine does not fall on one side of their ratio only.
The machine's matrix-multiply rate (the ceiling MFU is measured against): a large square matmul,
fp32 on CPU and bf16 on GPU, 2n³ FLOPs over its *fastest* run, since other work on the machine can
only slow a run down.

Peak memory, read in one extra untimed run: on a GPU torch.cuda.max_memory_allocated; on CPU the
peak resident memory of the process above what it held before (Linux VmHWM, reset through
/proc/self/clear_refs). Before it, malloc hands back the free memory it kept from earlier runs
(malloc_trim), and during it every block of 256 KB or more is mmap'd (set_mmap_threshold), so that
resident memory follows the tensors; otherwise reused blocks would not show. The timed runs keep
malloc's usual settings as near as they can be restored: afterwards the threshold is 32 MB, where
glibc's own adaptation of it stops, and no longer adapts (page faults on every large tensor would
slow them down; the README's speed section measures them).

Where the time goes (matmul_share): a FLOP bound counts matrix products only, so the fraction of a
run spent inside them says how far from the bound the rest of the work puts it: on CPU, the time of
every mm / bmm / addmm / baddbmm call as torch.profiler records it, over the run's wall time.
"""
import ctypes
import statistics
import time

import torch


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_bytes(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak(device):
    """Start a new peak-memory window; returns the baseline to subtract."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # resets VmHWM to the current VmRSS
    except OSError:
        return None
    return resident_bytes("VmRSS")


def peak_above(device, baseline):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - baseline
    peak = resident_bytes("VmHWM")
    if peak is None or baseline is None or peak - baseline < 2 ** 20:
        return None  # under 1 MB of growth: too small to tell from page counts ("n/a")
    return peak - baseline


def set_mmap_threshold(size):
    """glibc's malloc: blocks of at least `size` bytes are mmap'd, and handed back to the system when
    freed. By default the threshold grows after the first such free (up to 32 MB), so later tensors
    stay in malloc's heap: fast to reuse, but then resident memory no longer follows the tensors."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, size)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: the CPU peak is then an upper bound including allocator slack


def release_free_memory():
    """glibc's malloc_trim(0): give the free memory malloc keeps in its heap back to the system, so
    that a block reused from there counts as newly resident again (else the peak reads too low)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(function, device, repeats, warmup=1):
    """Median seconds of `function()` over `repeats` runs after `warmup` runs, and its peak memory
    (bytes above the start, from one more, untimed run: peak_memory)."""
    return measure_interleaved([function], device, repeats, warmup)[0]


def measure_interleaved(functions, device, repeats, warmup=1):
    """measure() for several functions whose times are compared, one run of each in turn (a, b, a, b,
    ...): a fast path and its slow alternative then see the same machine, and a slow spell on a
    shared machine lands on both instead of on one figure of the ratio. Also the mean, for work
    that varies from run to run by design (peer.py)."""
    for function in functions:
        for _ in range(warmup):
            function()
    synchronize(device)
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, runs in zip(functions, times):
            start = time.perf_counter()
            function()
            synchronize(device)
            runs.append(time.perf_counter() - start)
    return [dict(seconds=statistics.median(runs), mean_seconds=statistics.mean(runs),
                 peak_bytes=peak_memory(function, device)) for function, runs in zip(functions, times)]


def peak_memory(function, device):
    """Bytes above the start at the peak of one more, untimed run of `function`. On CPU malloc first
    hands back what it kept, then mmaps every block of 256 KB or more during the run, so that resident
    memory follows the tensors (module docstring); the timed runs keep the usual settings (page
    faults on every large tensor would slow them down by up to 2x)."""
    if device.type == "cuda":
        baseline = reset_peak(device)
        function()
        return peak_above(device, baseline)
    set_mmap_threshold(256 * 1024)
    release_free_memory()
    baseline = reset_peak(device)
    function()
    set_mmap_threshold(32 * 1024 * 1024)
    return peak_above(device, baseline)


def matmul_rate(device, n, repeats, dtype=None):
    """FLOP/s of an (n, n) @ (n, n) matmul, by default fp32 on CPU, bf16 on GPU (what training runs
    in): 2n³ over the fastest of the runs. The fastest, since the rate is a ceiling: other work on
    the machine can only slow a run down."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b  # warm-up
    times = []
    for _ in range(max(3, repeats)):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / min(times)


# The matrix products, which a FLOP count (torch.utils.flop_counter) counts. It counts fused attention
# kernels too, which are not listed here: the soft-capped models here attend on CPU by plain matmuls (bmm).
MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")


def matmul_share(function):
    """The fraction of one run of `function` (on CPU) spent inside matrix products: the time of every
    MATMUL_OPS call on the calling thread (its intra-op threads work in parallel with it) over the
    run's wall time. The rest is what the FLOP bound does not count: elementwise work
    (normalisation, softmax, activations, copies) and Python between the calls."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                acc_events=True) as profile:  # acc_events: keep this run's events, no warning
        start = time.perf_counter()
        function()
        wall = time.perf_counter() - start
    inside = sum(event.cpu_time_total for event in profile.key_averages() if event.key in MATMUL_OPS) / 1e6
    return inside / wall
