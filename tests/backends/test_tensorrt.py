"""TensorRT: the TensorRT-ready ONNX export (here, without TensorRT), the trtexec command, a clear
"not available here" everywhere TensorRT cannot run, and the trtexec output parsers on real output.

The fixtures below are trtexec output as printed by real runs, cut down to the lines that matter
(trace averages and build chatter dropped; every kept line is verbatim):

- TRT10_LOG: TensorRT 10.16 on an RTX 6000 Ada, NVIDIA/trt-samples-for-hackathon-cn,
  cookbook/07-Tool/trtexec/result-01.log at 02ed7b100287c37089469a2befc6a25baf06ce77.
- TRT84_LOG: TensorRT 8.4 (one percentile), WongKinYiu/yolov7 pull request #329, comment of
  2022-07-28 ("Dynamic batch=1"). Its log was cut after "=== Explanations of the performance
  metrics ==="; the two [V] lines after it are the explanations trtexec's --verbose output prints
  there (text from samples/common/sampleReporting.cpp, printMetricExplanations).
- TRT7_LOG: TensorRT 7.1 on a Jetson (JetPack 4, no summary header), shafikahdarwis/jetson-trtexec,
  result/prototxt/DLA_None/precision_int8/iteration_10/googlenet/raw_googlenet_None_int8_10.txt at
  d317d18feb775dc96983893764426854ead4efbe (its last run, --batch=128).
- FAILED_PLUGIN_LOG: TensorRT 8.6.1, AUTOMATIC1111/stable-diffusion-webui-tensorrt issue #54.
- FAILED_QDQ_LOG: TensorRT 8.6.1 rejecting a QAT graph's scales (a public note found through the
  code-search index, which does not name its repository).
- PROFILE_RUN_LOG: TensorRT 10.16 with --dumpProfile but no --separateProfileRun (no summary),
  NVIDIA/trt-samples-for-hackathon-cn, cookbook/07-Tool/trtexec/result-05.log at
  8cef71260bb62584590a317505f04d7ca16ac657.
- PROFILE_JSON: farabimahmud/detr-logs-trtexec, detr-profile.json (first layers; with medianMs).
- PROFILE_JSON_TRT7, TIMES_JSON_TRT7: shafikahdarwis/jetson-trtexec, the googlenet profile_/times_
  JSON beside TRT7_LOG (first entries).
"""

import sys
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from edge_compress.backends import ExportSource, get_backend
from edge_compress.backends import tensorrt as trt_backend
from edge_compress.backends.tensorrt import (TrtexecOutputError, layer_times_to_timings, parse_trtexec_log,
                                             parse_trtexec_profile, parse_trtexec_times, trt_layer_type,
                                             trtexec_command)
from edge_compress.data.synth import CLASS_NAMES
from edge_compress.errors import BackendUnavailableError, ConfigError
from edge_compress.export import FP32_REL_TOL, export_model
from edge_compress.models import create_detector
from edge_compress.quant import QuantConfig

TRT10_LOG = """\
&&&& RUNNING TensorRT.trtexec [TensorRT v101600] [b72] # trtexec --onnx=/work/github/trt-samples-for-hackathon-cn-wili/cookbook/00-Data/model/model-trained.onnx
[07/02/2026-03:47:01] [I] TF32 is enabled by default. Add --noTF32 flag to further improve accuracy with some performance cost.
[07/02/2026-03:47:01] [I] === Model Options ===
[07/02/2026-03:47:01] [I] Format: ONNX
[07/02/2026-03:47:01] [I] === Reporting Options ===
[07/02/2026-03:47:01] [I] Verbose: Disabled
[07/02/2026-03:47:01] [I] Averages: 10 inferences
[07/02/2026-03:47:01] [I] Percentiles: 90,95,99
[07/02/2026-03:47:01] [I]
[07/02/2026-03:47:01] [I] === Device Information ===
[07/02/2026-03:47:01] [I] Available Devices:
[07/02/2026-03:47:01] [I]   Device 0: "NVIDIA RTX 6000 Ada Generation" UUID: GPU-6794f491-ac89-5cef-cdc5-a41123217fbd
[07/02/2026-03:47:01] [I] Selected Device: NVIDIA RTX 6000 Ada Generation
[07/02/2026-03:47:01] [I] Selected Device ID: 0
[07/02/2026-03:47:01] [I] Compute Capability: 8.9
[07/02/2026-03:47:01] [I] SMs: 142
[07/02/2026-03:47:01] [I]
[07/02/2026-03:47:01] [I] TensorRT version: 10.16.0
[07/02/2026-03:47:01] [I] Loading standard plugins
[07/02/2026-03:47:05] [I] Starting inference
[07/02/2026-03:47:08] [I] Warmup completed 3349 queries over 200 ms
[07/02/2026-03:47:08] [I] Timing trace has 55177 queries over 3.00005 s
[07/02/2026-03:47:08] [I]
[07/02/2026-03:47:08] [I] === Trace details ===
[07/02/2026-03:47:08] [I] Trace averages of 10 runs:
[07/02/2026-03:47:08] [I] Average on 10 runs - GPU latency: 0.0324539 ms - Host latency: 0.040564 ms (enqueue 0.0283875 ms)
[07/02/2026-03:47:08] [I] Average on 10 runs - GPU latency: 0.0300293 ms - Host latency: 0.0416748 ms (enqueue 0.0297607 ms)
[07/02/2026-03:47:08] [I]
[07/02/2026-03:47:08] [I] === Performance summary ===
[07/02/2026-03:47:08] [I] Throughput: 18392 qps
[07/02/2026-03:47:08] [I] Latency: min = 0.0334473 ms, max = 0.882324 ms, mean = 0.0431899 ms, median = 0.0386963 ms, percentile(90%) = 0.0480957 ms, percentile(95%) = 0.0548096 ms, percentile(99%) = 0.144043 ms
[07/02/2026-03:47:08] [I] Enqueue Time: min = 0.0222168 ms, max = 0.714111 ms, mean = 0.0286857 ms, median = 0.0253906 ms, percentile(90%) = 0.034668 ms, percentile(95%) = 0.0402832 ms, percentile(99%) = 0.0578613 ms
[07/02/2026-03:47:08] [I] H2D Latency: min = 0.00268555 ms, max = 0.265503 ms, mean = 0.00441713 ms, median = 0.00390625 ms, percentile(90%) = 0.00524902 ms, percentile(95%) = 0.00610352 ms, percentile(99%) = 0.00952148 ms
[07/02/2026-03:47:08] [I] GPU Compute Time: min = 0.0266113 ms, max = 0.7229 ms, mean = 0.0334352 ms, median = 0.0297852 ms, percentile(90%) = 0.0378418 ms, percentile(95%) = 0.0429688 ms, percentile(99%) = 0.0952148 ms
[07/02/2026-03:47:08] [I] D2H Latency: min = 0.00317383 ms, max = 0.476074 ms, mean = 0.00533757 ms, median = 0.00512695 ms, percentile(90%) = 0.00646973 ms, percentile(95%) = 0.00720215 ms, percentile(99%) = 0.0129395 ms
[07/02/2026-03:47:08] [I] Total Host Walltime: 3.00005 s
[07/02/2026-03:47:08] [I] Total GPU Compute Time: 1.84486 s
[07/02/2026-03:47:08] [W] * Throughput may be bound by Enqueue Time rather than GPU Compute and the GPU may be under-utilized.
[07/02/2026-03:47:08] [W]   If not already in use, --useCudaGraph (utilize CUDA graphs where possible) may increase the throughput.
[07/02/2026-03:47:08] [W] * GPU compute time is unstable, with coefficient of variance = 62.0202%.
[07/02/2026-03:47:08] [W]   If not already in use, locking GPU clock frequency or adding --useSpinWait may improve the stability.
[07/02/2026-03:47:08] [I] Explanations of the performance metrics are printed in the verbose logs.
[07/02/2026-03:47:08] [I]
&&&& PASSED TensorRT.trtexec [TensorRT v101600] [b72] # trtexec --onnx=/work/github/trt-samples-for-hackathon-cn-wili/cookbook/00-Data/model/model-trained.onnx
"""

TRT84_LOG = """\
[07/28/2022-16:00:55] [I] === Performance summary ===
[07/28/2022-16:00:55] [I] Throughput: 716.632 qps
[07/28/2022-16:00:55] [I] Latency: min = 1.3476 ms, max = 1.5657 ms, mean = 1.38629 ms, median = 1.38037 ms, percentile(99%) = 1.55853 ms
[07/28/2022-16:00:55] [I] Enqueue Time: min = 0.0109863 ms, max = 0.0975342 ms, mean = 0.022185 ms, median = 0.0200195 ms, percentile(99%) = 0.071167 ms
[07/28/2022-16:00:55] [I] H2D Latency: min = 0 ms, max = 0 ms, mean = 0 ms, median = 0 ms, percentile(99%) = 0 ms
[07/28/2022-16:00:55] [I] GPU Compute Time: min = 1.3476 ms, max = 1.5657 ms, mean = 1.38629 ms, median = 1.38037 ms, percentile(99%) = 1.55853 ms
[07/28/2022-16:00:55] [I] D2H Latency: min = 0 ms, max = 0 ms, mean = 0 ms, median = 0 ms, percentile(99%) = 0 ms
[07/28/2022-16:00:55] [I] Total Host Walltime: 3.00294 s
[07/28/2022-16:00:55] [I] Total GPU Compute Time: 2.9833 s
[07/28/2022-16:00:55] [W] * GPU compute time is unstable, with coefficient of variance = 2.10486%.
[07/28/2022-16:00:55] [W]   If not already in use, locking GPU clock frequency or adding --useSpinWait may improve the stability.
[07/28/2022-16:00:55] [I] Explanations of the performance metrics are printed in the verbose logs.
[07/28/2022-16:00:55] [V] 
[07/28/2022-16:00:55] [V] === Explanations of the performance metrics ===
[07/28/2022-16:00:55] [V] Total Host Walltime: the host walltime from when the first query (after warmups) is enqueued to when the last query is completed.
[07/28/2022-16:00:55] [V] GPU Compute Time: the GPU latency to execute the kernels for a query.
"""

TRT7_LOG = """\
&&&& RUNNING TensorRT.trtexec # /usr/src/tensorrt/bin/trtexec --avgRuns=3 --deploy=/usr/src/tensorrt/data/googlenet/googlenet.prototxt --int8 --batch=128 --iterations=10 --output=prob --useSpinWait --exportTimes=times_googlenet_None_int8_10_128.json --exportOutput=output_googlenet_None_int8_10_128.json --exportProfile=profile_googlenet_None_int8_10_128.json
[02/21/2021-23:01:06] [I] === Model Options ===
[02/21/2021-23:01:06] [I] Format: Caffe
[02/21/2021-23:01:06] [I] Precision: FP32+INT8
[02/21/2021-23:01:06] [I] Batch: 128
[02/21/2021-23:01:06] [I] Percentile: 99
[02/21/2021-23:07:59] [I] [TRT] Detected 1 inputs and 1 output network tensors.
[02/21/2021-23:07:59] [I] Starting inference threads
[02/21/2021-23:08:03] [I] Warmup completed 256 queries over 200 ms
[02/21/2021-23:08:03] [I] Timing trace has 4352 queries over 3.26362 s
[02/21/2021-23:08:03] [I] Trace averages of 3 runs:
[02/21/2021-23:08:03] [I] Average on 3 runs - GPU latency: 92.2255 ms - Host latency: 95.6863 ms (end to end 95.7148 ms, enqueue 95.5285 ms)
[02/21/2021-23:08:03] [I] Average on 3 runs - GPU latency: 92.213 ms - Host latency: 95.8267 ms (end to end 95.8444 ms, enqueue 95.5854 ms)
[02/21/2021-23:08:03] [I] Host Latency
[02/21/2021-23:08:03] [I] min: 94.6685 ms (end to end 94.9104 ms)
[02/21/2021-23:08:03] [I] max: 102.536 ms (end to end 102.755 ms)
[02/21/2021-23:08:03] [I] mean: 95.8883 ms (end to end 95.9813 ms)
[02/21/2021-23:08:03] [I] median: 95.1907 ms (end to end 95.3555 ms)
[02/21/2021-23:08:03] [I] percentile: 102.536 ms at 99% (end to end 102.755 ms at 99%)
[02/21/2021-23:08:03] [I] throughput: 1333.49 qps
[02/21/2021-23:08:03] [I] walltime: 3.26362 s
[02/21/2021-23:08:03] [I] Enqueue Time
[02/21/2021-23:08:03] [I] min: 94.7563 ms
[02/21/2021-23:08:03] [I] max: 102.38 ms
[02/21/2021-23:08:03] [I] median: 95.1918 ms
[02/21/2021-23:08:03] [I] GPU Compute
[02/21/2021-23:08:03] [I] min: 91.0652 ms
[02/21/2021-23:08:03] [I] max: 98.9993 ms
[02/21/2021-23:08:03] [I] mean: 92.2887 ms
[02/21/2021-23:08:03] [I] median: 91.6031 ms
[02/21/2021-23:08:03] [I] percentile: 98.9993 ms at 99%
[02/21/2021-23:08:03] [I] total compute time: 3.13782 s
&&&& PASSED TensorRT.trtexec # /usr/src/tensorrt/bin/trtexec --avgRuns=3 --deploy=/usr/src/tensorrt/data/googlenet/googlenet.prototxt --int8 --batch=128 --iterations=10 --output=prob --useSpinWait --exportTimes=times_googlenet_None_int8_10_128.json --exportOutput=output_googlenet_None_int8_10_128.json --exportProfile=profile_googlenet_None_int8_10_128.json
"""

FAILED_PLUGIN_LOG = """\
[07/18/2023-14:17:05] [E] [TRT] ModelImporter.cpp:729: --- End node ---
[07/18/2023-14:17:05] [E] [TRT] ModelImporter.cpp:732: ERROR: builtin_op_importers.cpp:5428 In function importFallbackPluginImporter:
[8] Assertion failed: creator && "Plugin not found, are the plugin name, version, and namespace correct?"
[07/18/2023-14:17:05] [E] Failed to parse onnx file
[07/18/2023-14:17:05] [I] Finished parsing network model. Parse time: 1.98327
[07/18/2023-14:17:05] [E] Parsing model failed
[07/18/2023-14:17:05] [E] Failed to create engine from model or file.
[07/18/2023-14:17:05] [E] Engine set up failed
"""

FAILED_QDQ_LOG = """\
[09/02/2025-12:43:58] [E] [TRT] ModelImporter.cpp:774: --- End node ---
[09/02/2025-12:43:58] [E] [TRT] ModelImporter.cpp:777: ERROR: builtin_op_importers.cpp:1197 In function QuantDequantLinearHelper:
[6] Assertion failed: scaleAllPositive && "Scale coefficients must all be positive"
[09/02/2025-12:43:58] [E] Failed to parse onnx file
[09/02/2025-12:43:58] [I] Finished parsing network model. Parse time: 0.230179
[09/02/2025-12:43:58] [E] Parsing model failed
[09/02/2025-12:43:58] [E] Failed to create engine from model or file.
[09/02/2025-12:43:58] [E] Engine set up failed
&&&& FAILED TensorRT.trtexec [TensorRT v8601] # trtexec --onnx=/home/ma-user/work/copy/yolov5_QAT-main/qat.onnx --saveEngine=/home/ma-user/work/copy/files/video-deal-search/video-deal-service/weights/CP26classes_epoch_180_int8_bs10_640_1088_from_exec.trt --int8 --workspace=1024000 --verbose
"""

PROFILE_RUN_LOG = """\
&&&& RUNNING TensorRT.trtexec [TensorRT v101600] [b72] # trtexec --loadEngine=./model-trained.trt --dumpProfile --exportTimes=./model-trained-exportTimes.json --exportProfile=./model-trained-exportProfile.json
[04/25/2026-04:28:29] [I] TensorRT version: 10.16.0
[04/25/2026-04:28:29] [I] Starting inference
[04/25/2026-04:28:32] [I] The e2e network timing is not reported since it is inaccurate due to the extra synchronizations when the profiler is enabled.
[04/25/2026-04:28:32] [I] To show e2e network timing report, add --separateProfileRun to profile layer timing in a separate run or remove --dumpProfile to disable the profiler.
[04/25/2026-04:28:32] [I] 
[04/25/2026-04:28:32] [I] === Profile (19952 iterations ) ===
[04/25/2026-04:28:32] [I]    Time(ms)     Avg.(ms)   Median(ms)   Time(%)   Layer
[04/25/2026-04:28:32] [I]      141.68       0.0071       0.0061       9.6   Reformatting CopyNode for Input Tensor 0 to node_conv2d + node_relu
[04/25/2026-04:28:32] [I]      128.63       0.0064       0.0061       8.8   node_conv2d + node_relu
[04/25/2026-04:28:32] [I]     1469.76       0.0737       0.0687     100.0   Total
[04/25/2026-04:28:32] [I] 
[04/25/2026-04:28:32] [W] The engine uses 2 auxiliary streams, so the "Total" latency may not be accurate because some layers may have run in parallel!
&&&& PASSED TensorRT.trtexec [TensorRT v101600] [b72] # trtexec --loadEngine=./model-trained.trt --dumpProfile --exportTimes=./model-trained-exportTimes.json --exportProfile=./model-trained-exportProfile.json
"""

PROFILE_JSON = """\
[
  { "count" : 641 }
, { "name" : "/model/model/Transpose_1_output_0", "timeMs" : 0, "averageMs" : 0, "medianMs" : 0, "percentage" : 0 }
, { "name" : "/Constant_5_output_0", "timeMs" : 0, "averageMs" : 0, "medianMs" : 0, "percentage" : 0 }
, { "name" : "Reformatting CopyNode for Input Tensor 0 to PWN(PWN(/Sub), PWN(/Div))", "timeMs" : 12.8778, "averageMs" : 0.0200902, "medianMs" : 0.019904, "percentage" : 0.482752 }
, { "name" : "PWN(PWN(/Sub), PWN(/Div))", "timeMs" : 15.1954, "averageMs" : 0.0237058, "medianMs" : 0.023296, "percentage" : 0.569632 }
, { "name" : "/model/model/backbone/conv_encoder/model/conv1/Conv + onnx::Mul_4104 + /model/model/backbone/conv_encoder/model/bn1/Mul + onnx::Add_4106 + /model/model/backbone/conv_encoder/model/bn1/Add + /model/model/backbone/conv_encoder/model/act1/Relu + /model/model/backbone/conv_encoder/model/maxpool/MaxPool", "timeMs" : 28.9723, "averageMs" : 0.0451986, "medianMs" : 0.044224, "percentage" : 1.08608 }
, { "name" : "/model/model/backbone/conv_encoder/model/layer1/0/conv1/Conv + onnx::Mul_4114 + /model/model/backbone/conv_encoder/model/layer1/0/bn1/Mul + onnx::Add_4116 + /model/model/backbone/conv_encoder/model/layer1/0/bn1/Add + /model/model/backbone/conv_encoder/model/layer1/0/act1/Relu", "timeMs" : 8.85741, "averageMs" : 0.0138181, "medianMs" : 0.013312, "percentage" : 0.332038 }
]
"""

PROFILE_JSON_TRT7 = """\
[
  { "count" : 1520 }
, { "name" : "conv1/7x7_s2 + conv1/relu_7x7 + pool1/3x3_s2 input reformatter 0", "timeMs" : 71.2658, "averageMs" : 0.0468854, "percentage" : 2.38803 }
, { "name" : "conv1/7x7_s2 + conv1/relu_7x7 + pool1/3x3_s2", "timeMs" : 100.648, "averageMs" : 0.0662156, "percentage" : 3.37258 }
, { "name" : "pool1/norm1", "timeMs" : 39.9628, "averageMs" : 0.0262913, "percentage" : 1.3391 }
]
"""

TIMES_JSON_TRT7 = """\
[
  { "startEnqMs" : 0.226368, "endEnqMs" : 0.315968, "startInMs" : 0.683045, "endInMs" : 5.17184, "startComputeMs" : 0.329696, "endComputeMs" : 4.82835, "startOutMs" : 4.84864, "endOutMs" : 4.8919, "inMs" : 0.0896, "computeMs" : 4.49866, "outMs" : 0.0432639, "latencyMs" : 4.63152, "endToEndMs" : 4.66554 }
, { "startEnqMs" : 4.90006, "endEnqMs" : 4.9552, "startInMs" : 5.28791, "endInMs" : 8.01263, "startComputeMs" : 4.96534, "endComputeMs" : 7.66912, "startOutMs" : 7.6857, "endOutMs" : 7.79206, "inMs" : 0.0551362, "computeMs" : 2.70378, "outMs" : 0.106368, "latencyMs" : 2.86528, "endToEndMs" : 2.892 }
]
"""

# TensorRT 8.6+/10.x key names and layout (exportJSONTrace in sampleReporting.cpp); the values are
# made up to be self-consistent, since no real file of this version was at hand.
TIMES_JSON_TRT10 = """\
[
  { "startEnqMs" : 200.5, "endEnqMs" : 200.53, "startH2dMs" : 200.54, "endH2dMs" : 200.545, "startComputeMs" : 200.55, "endComputeMs" : 200.58, "startD2hMs" : 200.585, "endD2hMs" : 200.59, "h2dMs" : 0.005, "computeMs" : 0.03, "d2hMs" : 0.005, "latencyMs" : 0.04 }
, { "startEnqMs" : 200.6, "endEnqMs" : 200.62, "startH2dMs" : 200.63, "endH2dMs" : 200.634, "startComputeMs" : 200.64, "endComputeMs" : 200.672, "startD2hMs" : 200.675, "endD2hMs" : 200.681, "h2dMs" : 0.004, "computeMs" : 0.032, "d2hMs" : 0.006, "latencyMs" : 0.042 }
]
"""


# --- the parsers on real trtexec output --------------------------------------------------------

def test_trtexec_10_summary_version_and_device():
    r = parse_trtexec_log(TRT10_LOG)
    assert (r.version, r.device, r.log_format) == ("10.16.0", "NVIDIA RTX 6000 Ada Generation", "summary")
    assert r.throughput_qps == 18392.0
    assert (r.min_ms, r.max_ms, r.mean_ms, r.p50_ms) == (0.0334473, 0.882324, 0.0431899, 0.0386963)
    assert (r.p90_ms, r.p95_ms, r.p99_ms) == (0.0480957, 0.0548096, 0.144043)
    g = r.gpu_compute
    assert (g.min, g.max, g.mean, g.median) == (0.0266113, 0.7229, 0.0334352, 0.0297852)
    assert g.percentiles == {90.0: 0.0378418, 95.0: 0.0429688, 99.0: 0.0952148}
    assert (r.enqueue.percentile(99), r.h2d.median, r.d2h.max) == (0.0578613, 0.00390625, 0.476074)
    assert r.end_to_end is None   # printed by TensorRT 8.0-8.4 only
    assert (r.host_walltime_s, r.gpu_compute_total_s) == (3.00005, 1.84486)
    assert len(r.warnings) == 4 and r.warnings[0].startswith("* Throughput may be bound by Enqueue Time")


def test_trtexec_84_single_percentile_and_verbose_explanations():
    r = parse_trtexec_log(TRT84_LOG)
    assert (r.version, r.device) == (None, None)   # the excerpt starts at the summary
    assert r.throughput_qps == 716.632
    assert (r.min_ms, r.max_ms, r.mean_ms, r.p50_ms, r.p99_ms) == (1.3476, 1.5657, 1.38629, 1.38037, 1.55853)
    assert (r.p90_ms, r.p95_ms) == (None, None)
    # the verbose "GPU Compute Time: the GPU latency ..." explanation does not overwrite the figure
    assert r.gpu_compute.median == 1.38037 and r.gpu_compute_total_s == 2.9833 and r.host_walltime_s == 3.00294
    assert r.h2d.to_dict() == {"min": 0.0, "max": 0.0, "mean": 0.0, "p50": 0.0, "p90": None, "p95": None, "p99": 0.0}
    assert r.warnings == ("* GPU compute time is unstable, with coefficient of variance = 2.10486%.",
                          "If not already in use, locking GPU clock frequency or adding --useSpinWait may "
                          "improve the stability.")


def test_trtexec_7_legacy_blocks():
    r = parse_trtexec_log(TRT7_LOG)
    assert (r.log_format, r.version, r.device) == ("legacy", None, None)
    assert (r.min_ms, r.max_ms, r.mean_ms, r.p50_ms, r.p99_ms) == (94.6685, 102.536, 95.8883, 95.1907, 102.536)
    e = r.end_to_end
    assert (e.min, e.max, e.mean, e.median, e.percentile(99)) == (94.9104, 102.755, 95.9813, 95.3555, 102.755)
    assert (r.throughput_qps, r.host_walltime_s, r.gpu_compute_total_s) == (1333.49, 3.26362, 3.13782)
    assert (r.enqueue.min, r.enqueue.max, r.enqueue.median, r.enqueue.mean) == (94.7563, 102.38, 95.1918, None)
    g = r.gpu_compute
    assert (g.min, g.max, g.mean, g.median, g.percentile(99)) == (91.0652, 98.9993, 92.2887, 91.6031, 98.9993)


def test_version_from_the_header_when_no_version_line():
    header = "&&&& RUNNING TensorRT.trtexec [TensorRT v8502] # /usr/src/tensorrt/bin/trtexec --onnx=m.onnx\n"
    assert parse_trtexec_log(header + TRT84_LOG).version == "8.5.2"
    assert parse_trtexec_log(TRT10_LOG.replace("TensorRT version: 10.16.0", "")).version == "10.16.0"


def test_to_profile_is_a_json_record_with_raw_samples():
    import json

    r = parse_trtexec_log(TRT10_LOG)
    p = r.to_profile(parse_trtexec_times(TIMES_JSON_TRT10))
    assert json.loads(json.dumps(p)) == p
    assert (p["source"], p["runtime"], p["runtime_version"]) == ("trtexec", "tensorrt", "10.16.0")
    assert p["latency_ms"] == {"min": 0.0334473, "max": 0.882324, "mean": 0.0431899, "p50": 0.0386963,
                               "p90": 0.0480957, "p95": 0.0548096, "p99": 0.144043}
    assert p["gpu_compute_ms"]["p99"] == 0.0952148 and p["throughput_qps"] == 18392.0
    assert p["samples_ms"]["latency"] == [0.04, 0.042] and p["samples_ms"]["end_to_end"] is None


@pytest.mark.parametrize("log, quoted", [
    (FAILED_PLUGIN_LOG, "Plugin not found"),
    (FAILED_QDQ_LOG, "&&&& FAILED TensorRT.trtexec [TensorRT v8601]"),
])
def test_a_failed_build_is_a_clear_error_quoting_its_last_errors(log, quoted):
    with pytest.raises(TrtexecOutputError, match="failed before it timed anything") as e:
        parse_trtexec_log(log)
    assert quoted in str(e.value) and "Engine set up failed" in str(e.value)


def test_a_profiled_run_without_separate_profile_run_says_which_flag_is_missing():
    with pytest.raises(TrtexecOutputError, match="--separateProfileRun"):
        parse_trtexec_log(PROFILE_RUN_LOG)
    with pytest.raises(TrtexecOutputError, match="no '=== Performance summary ==='"):
        parse_trtexec_log("hello\n")
    with pytest.raises(TrtexecOutputError, match=r"lacks \['gpu_compute'\]"):
        parse_trtexec_log("\n".join(line for line in TRT84_LOG.splitlines() if "GPU Compute Time" not in line))


def test_profile_json_medians_in_us_and_layers_that_did_not_run_dropped():
    got = parse_trtexec_profile(PROFILE_JSON)
    assert [(t.op_type, round(t.median_us, 3), t.samples) for t in got] == [
        ("Reformat", 19.904, 641), ("PointWise", 23.296, 641), ("Conv", 44.224, 641), ("Conv", 13.312, 641)]
    assert got[2].name.startswith("/model/model/backbone/conv_encoder/model/conv1/Conv + ")
    old = parse_trtexec_profile(PROFILE_JSON_TRT7)   # before TensorRT 8.6: no medianMs, the average stands in
    assert [(t.name, round(t.median_us, 4), t.samples) for t in old][-1] == ("pool1/norm1", 26.2913, 1520)
    with pytest.raises(TrtexecOutputError, match="not valid JSON"):
        parse_trtexec_profile(PROFILE_JSON + PROFILE_JSON)   # two runs appended to one file
    with pytest.raises(TrtexecOutputError, match="count"):
        parse_trtexec_profile("[]")


def test_times_json_both_key_spellings():
    old = parse_trtexec_times(TIMES_JSON_TRT7)
    assert len(old) == 2 and old.latency_ms == (4.63152, 2.86528) and old.compute_ms == (4.49866, 2.70378)
    assert old.h2d_ms == (0.0896, 0.0551362) and old.d2h_ms == (0.0432639, 0.106368)
    assert old.end_to_end_ms == (4.66554, 2.892)
    assert old.enqueue_ms == pytest.approx((0.0896, 0.05514))
    new = parse_trtexec_times(TIMES_JSON_TRT10)
    assert new.h2d_ms == (0.005, 0.004) and new.d2h_ms == (0.005, 0.006) and new.end_to_end_ms is None
    with pytest.raises(TrtexecOutputError, match="latencyMs"):
        parse_trtexec_times('[{"startEnqMs": 0, "endEnqMs": 1}]')


def test_iprofiler_reports_become_medians_after_warmup():
    times = {"/stem/conv/Conv + /stem/act/Relu": [9.0, 0.010, 0.030, 0.020], "Reformatting CopyNode for x": [1.0, 0.002]}
    got = layer_times_to_timings(times, warmup=1)
    assert [(t.op_type, round(t.median_us, 6), t.samples) for t in got] == [("Conv", 20.0, 3), ("Reformat", 2.0, 1)]
    assert trt_layer_type("{ForeignNode[/head/Reshape.../head/Concat]}") == "Myelin"
    assert trt_layer_type("conv1/7x7_s2 + conv1/relu_7x7") == "TensorRT"


# --- the trtexec command ----------------------------------------------------------------------

def test_trtexec_command_flags():
    fp32, int8 = trtexec_command("model.onnx", "fp32"), trtexec_command("model.onnx", "int8")
    assert fp32.startswith("trtexec --onnx=model.onnx --saveEngine=model.engine ")
    assert "--int8" not in fp32 and "--fp16" not in fp32
    assert int8 == fp32.replace("--saveEngine=model.engine ", "--saveEngine=model.engine --int8 ")
    for flag in ("--warmUp=500", "--iterations=100", "--avgRuns=10", "--useSpinWait", "--separateProfileRun",
                 "--dumpProfile", "--exportProfile=profile.json", "--exportTimes=times.json", "--dumpLayerInfo",
                 "--exportLayerInfo=layers.json", "--profilingVerbosity=detailed"):
        assert f" {flag}" in fp32
    assert "--shapes" not in fp32   # static shapes
    with pytest.raises(ConfigError, match="fp16"):
        trtexec_command("model.onnx", "fp16")


# --- availability here ------------------------------------------------------------------------

def test_not_available_here_says_why_and_how_to_install():
    if "tensorrt" in sys.modules or _importable("tensorrt"):
        pytest.skip("TensorRT is installed here")
    ok, why = get_backend("tensorrt", require_available=False).available()
    assert not ok and "tensorrt Python module cannot be imported" in why and "JetPack" in why
    with pytest.raises(BackendUnavailableError, match="backend 'tensorrt' is not available here: the tensorrt"):
        get_backend("tensorrt")


def test_with_tensorrt_but_no_gpu_or_no_cuda_python_the_reason_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(trt_backend, "GPU_DEVICE_NODES", (str(tmp_path / "nvidia0"),))
    ok, why = get_backend("tensorrt", require_available=False).available()
    assert not ok and why.startswith("no NVIDIA GPU is visible")
    (tmp_path / "nvidia0").touch()
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    ok, why = get_backend("tensorrt", require_available=False).available()
    assert not ok and "needs cuda-python" in why


# --- export of zoo detectors ------------------------------------------------------------------

def _detector():
    torch.manual_seed(0)
    return create_detector("ssdlite_mbv2", class_names=CLASS_NAMES, input_size=64).eval()


@pytest.fixture(scope="module")
def fp32_artifact(tmp_path_factory):
    return export_model(_detector(), "tensorrt", tmp_path_factory.mktemp("trt") / "fp32")


@pytest.fixture(scope="module")
def int8_artifact(tiny_synth, tmp_path_factory):
    return export_model(_detector(), "tensorrt", tmp_path_factory.mktemp("trt") / "int8",
                        quant=QuantConfig(num_images=4), data=tiny_synth)


def test_fp32_export(fp32_artifact):
    m = fp32_artifact.manifest
    assert m["backend"] == {"name": "tensorrt", "runtime_version": "not installed on the exporting machine"}
    assert m["model_file"] == "model.onnx" and sorted(m["files"]) == ["model.onnx"]
    t = m["tensorrt"]
    assert t["trtexec_command"] == trtexec_command("model.onnx", "fp32") and "--int8" not in t["trtexec_command"]
    assert (t["engine_file"], t["precision"]) == ("model.engine", "fp32")
    v = m["validation"]
    assert v["rel_error"] <= FP32_REL_TOL and v["passed"]
    assert v["runtime"].startswith("onnxruntime on the deployed ONNX graph (tensorrt cannot run here: the tensorrt")
    assert m["precision"] and set(m["precision"].values()) == {"fp32"}
    graph = onnx.load(str(fp32_artifact.path / "model.onnx")).graph
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [1, 3, 64, 64]


def test_int8_export_is_explicitly_quantized_for_tensorrt(int8_artifact):
    m = int8_artifact.manifest
    assert "--int8" in m["tensorrt"]["trtexec_command"] and m["tensorrt"]["precision"] == "int8"
    assert sorted(m["files"]) == ["calibration.json", "model.onnx"]
    assert m["quantization"]["activations"] == "int8 symmetric per tensor (zero point 0)"
    v = m["validation"]
    assert v["metric"].startswith("SQNR") and v["passed"] and v["runtime"].startswith("onnxruntime on the deployed")
    graph = onnx.load(str(int8_artifact.path / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert quantize
    for n in quantize:   # every activation Q: per-tensor scale, int8 zero point 0
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any() and inits[n.input[1]].shape == ()
    producer = {o: n for n in graph.node for o in n.output}
    int8_convs = [n for n in graph.node if n.op_type == "Conv" and m["precision"][n.name] == "int8"]
    assert int8_convs and len(int8_convs) >= len(m["precision"]) // 2
    for conv in int8_convs:   # weights: int8, symmetric, one scale per output channel along axis 0
        dq = producer[conv.input[1]]
        w, scale, zp = inits[dq.input[0]], inits[dq.input[1]], inits[dq.input[2]]
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        assert dq.op_type == "DequantizeLinear" and w.dtype == np.int8 and not zp.any()
        assert axis == 0 and scale.shape == (w.shape[0],)


def test_load_and_profile_raise_the_reason(fp32_artifact):
    backend = get_backend("tensorrt", require_available=False)
    _, why = backend.available()
    with pytest.raises(BackendUnavailableError, match="backend 'tensorrt' cannot run here") as e:
        backend.load(fp32_artifact.path)
    assert why in str(e.value)
    with pytest.raises(BackendUnavailableError, match="cannot run here"):
        backend.profile_layers(fp32_artifact.path, np.zeros((1, 3, 64, 64), np.float32))


def test_dynamic_shapes_are_refused(fp32_artifact, tmp_path):
    model = onnx.load(str(fp32_artifact.path / "model.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    path = tmp_path / "dynamic.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "out"
    out.mkdir()
    backend = get_backend("tensorrt", require_available=False)
    with pytest.raises(ConfigError, match=r"input 'images' has dynamic shape \['batch', 3, 64, 64\].*static shapes"):
        backend.export(ExportSource(onnx=path, fp32_onnx=path), out)


def test_int8_graphs_not_in_tensorrt_format_are_refused(fp32_artifact, tmp_path):
    backend = get_backend("tensorrt", require_available=False)
    fp32 = fp32_artifact.path / "model.onnx"
    with pytest.raises(ConfigError, match="no QuantizeLinear/DequantizeLinear nodes"):
        backend.export(ExportSource(onnx=fp32, fp32_onnx=fp32, precision="int8"), tmp_path)
    uint8 = _qdq_graph(tmp_path / "uint8.onnx", np.uint8, 128)   # ONNX Runtime / OpenVINO style activations
    with pytest.raises(ConfigError, match="zero point is uint8, TensorRT needs int8"):
        backend.export(ExportSource(onnx=uint8, fp32_onnx=uint8, precision="int8"), tmp_path)
    shifted = _qdq_graph(tmp_path / "shifted.onnx", np.int8, 3)
    with pytest.raises(ConfigError, match=r"zero point \[3\] is not 0"):
        backend.export(ExportSource(onnx=shifted, fp32_onnx=shifted, precision="int8"), tmp_path)


def _qdq_graph(path, dtype, zero_point):
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.array(zero_point, dtype), "zp")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq")]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])], [scale, zp])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


# --- the device-side code against a null TensorRT (the real one needs an NVIDIA GPU) -------------

class _NullCudart:
    """cuda-python's runtime calls used by the runner, on host memory."""

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self):
        self.mem, self.next = {}, 4096

    def cudaGetDeviceCount(self):
        return 0, 1

    def cudaGetDeviceProperties(self, i):
        return 0, types.SimpleNamespace(name=b"Null Orin")

    def cudaStreamCreate(self):
        return 0, "stream"

    def cudaStreamDestroy(self, stream):
        return (0,)

    def cudaStreamSynchronize(self, stream):
        return (0,)

    def cudaMalloc(self, n):
        self.next += n
        self.mem[self.next] = np.zeros(n, np.uint8)
        return 0, self.next

    def cudaFree(self, ptr):
        self.mem.pop(ptr, None)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        import ctypes

        if kind == self.cudaMemcpyKind.cudaMemcpyHostToDevice:
            self.mem[dst][:] = np.frombuffer(ctypes.string_at(src, n), np.uint8)
        else:
            ctypes.memmove(dst, self.mem[src].ctypes.data, n)
        return (0,)


def _null_tensorrt(cudart, built):
    """The slice of TensorRT's Python API the backend uses; the "engine" outputs each image's mean."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    ns = types.SimpleNamespace
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.NetworkDefinitionCreationFlag = ns(EXPLICIT_BATCH=0)
    trt.MemoryPoolType, trt.ProfilingVerbosity = ns(WORKSPACE="workspace"), ns(DETAILED="detailed")
    trt.BuilderFlag, trt.LayerType = ns(INT8="int8"), ns(QUANTIZE="quantize", CONVOLUTION="conv")
    trt.TensorIOMode, trt.DataType = ns(INPUT="in", OUTPUT="out"), ns(FLOAT="float32")
    trt.IProfiler = type("IProfiler", (), {"__init__": lambda self: None})

    class Network:
        layers: list = []
        num_layers = property(lambda self: len(self.layers))

        def get_layer(self, i):
            return ns(type=self.layers[i])

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse(self, data):
            self.network.layers = ["quantize", "conv"] if b"QuantizeLinear" in data else ["conv"]
            return True

    class Config:
        def __init__(self):
            self.flags = []

        def set_flag(self, flag):
            self.flags.append(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pool = (pool, size)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            built.append(config.flags)
            return b"null engine"

    class Context:
        profiler = None

        def __init__(self):
            self.addr = {}

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, stream):
            x = cudart.mem[self.addr["images"]].view(np.float32)
            cudart.mem[self.addr["raw"]].view(np.float32)[:] = x.mean()
            if self.profiler is not None:
                self.profiler.report_layer_time("/backbone/stem/Conv + /backbone/stem/Relu", 0.02)
            return True

    class Engine:
        num_io_tensors = 2
        shapes = {"images": (1, 3, 64, 64), "raw": (1, 4, 2)}

        def get_tensor_name(self, i):
            return ["images", "raw"][i]

        def get_tensor_mode(self, name):
            return "in" if name == "images" else "out"

        def get_tensor_shape(self, name):
            return self.shapes[name]

        def get_tensor_dtype(self, name):
            return "float32"

        def create_execution_context(self):
            return Context()

    trt.Builder, trt.OnnxParser = Builder, Parser
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                       "deserialize_cuda_engine": lambda self, plan: Engine()})
    return trt


@pytest.fixture
def null_device(monkeypatch, tmp_path):
    cudart, built = _NullCudart(), []
    monkeypatch.setitem(sys.modules, "tensorrt", _null_tensorrt(cudart, built))
    monkeypatch.setattr(trt_backend, "_cudart", lambda: cudart)
    (tmp_path / "nvidia0").touch()
    monkeypatch.setattr(trt_backend, "GPU_DEVICE_NODES", (str(tmp_path / "nvidia0"),))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return built, tmp_path / "cache" / "edge_compress" / "tensorrt"


def test_runner_builds_once_caches_outside_the_artifact_and_runs_image_by_image(null_device, fp32_artifact,
                                                                              int8_artifact):
    built, cache = null_device
    backend = get_backend("tensorrt")   # available: a module, a GPU node, a CUDA device
    before = sorted(p.name for p in fp32_artifact.path.iterdir())
    x = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    out = backend.load(fp32_artifact.path)(x)
    assert out.shape == (3, 4, 2) and np.allclose(out[:, 0, 0], x.reshape(3, -1).mean(axis=1))
    backend.load(fp32_artifact.path)   # the second load reads the cached engine
    backend.load(int8_artifact.path)
    assert built == [[], ["int8"]]     # a Q/DQ graph is built with the INT8 flag, as trtexec --int8
    assert len(list(cache.glob("*.engine"))) == 2
    assert sorted(p.name for p in fp32_artifact.path.iterdir()) == before   # nothing written into the artifact
    timings = backend.profile_layers(fp32_artifact.path, x, repeats=4, warmup=2)
    assert [(t.name, t.op_type, round(t.median_us, 6), t.samples) for t in timings] == [
        ("/backbone/stem/Conv + /backbone/stem/Relu", "Conv", 20.0, 4)]
