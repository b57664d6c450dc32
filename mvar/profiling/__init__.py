"""Profiling instruments, one module each (the experiments that use them to make Table 2's
compute rows are in ``repro/compute.py``):

* :mod:`~mvar.profiling.flops`: attention MACs, closed form and a counter hooked on the
  attention cores (``counted`` / ``analytic``); full-model MACs per image, closed form and a
  dispatch-level counter of every matmul/convolution of a sampling run;
* :mod:`~mvar.profiling.memory`: the live-bytes tracker (``estimated`` peak memory without a
  GPU) and torch's CUDA peaks (``measured``);
* :mod:`~mvar.profiling.nvml`: the device's memory polled through NVML (``measured``);
* :mod:`~mvar.profiling.timer`: synchronised, warm-up-excluded median timing (``measured``);
* :mod:`~mvar.profiling.fake`: paper-size models under ``FakeTensorMode``.
"""

from mvar.profiling.fake import FAKE_NA_BACKEND, FakeModels, build_fake, labels_for
from mvar.profiling.flops import (
    AttentionCounter,
    AttentionMacs,
    ModelFlopCounter,
    ModelMacs,
    analytic_attention_macs,
    analytic_kv_cache_bytes,
    analytic_sampling_macs,
    attention_pairs_per_scale,
)
from mvar.profiling.memory import (
    CUDA_BLOCK_BYTES,
    MiB,
    CudaMemory,
    LiveBytesTracker,
    cuda_memory,
    mib,
    module_tensors,
    tensor_bytes,
)
from mvar.profiling.nvml import NvmlPeakPoller, NvmlReading
from mvar.profiling.timer import Timing, time_call

__all__ = [
    "CUDA_BLOCK_BYTES", "FAKE_NA_BACKEND", "AttentionCounter", "AttentionMacs", "CudaMemory",
    "FakeModels", "LiveBytesTracker", "MiB", "ModelFlopCounter", "ModelMacs", "NvmlPeakPoller", "NvmlReading", "Timing",
    "analytic_attention_macs", "analytic_kv_cache_bytes", "analytic_sampling_macs", "attention_pairs_per_scale",
    "build_fake", "cuda_memory", "labels_for", "mib", "module_tensors", "tensor_bytes",
    "time_call",
]  # fmt: skip
