"""How long ``build_spec`` takes relative to one ``torch.export`` of the same model.

``maskalign.build_spec(model, example_inputs)`` is ``capture`` (one
``torch.export.export(strict=False)`` in eval mode, then a check that re-runs the
captured graph against the eager model), the train-mode probe
(``modes.mode_difference``: one eager forward per mode; a second, train-mode
export only when the modes differ), ``rules.analyze`` (one pass of axis
propagation) and ``spec.spec_from_analysis``. The target is that everything
beyond the export adds at most 30% on top of it (``build / export <= 1.3``), and
that the analysis scales about linearly with the number of graph nodes (a tiny
Llama with grouped-query attention, 1 to 8 layers).

For every model, in one run and interleaved (repeat r measures every model
before repeat r+1 starts, and the order of the three measurements alternates),
the script times with ``time.perf_counter``:

* ``export``: one ``torch.export.export(model, args, strict=False)`` under
  ``torch.no_grad()`` with the model in eval mode;
* ``build``: one ``maskalign.build_spec(model, args)``;
* a staged run ``capture`` / ``analyze`` / ``spec_from_analysis``, with the
  capture split into the export it makes, the eager-vs-graph check (``graph`` =
  ``CapturedGraph.run``: building a ``torch.fx.GraphModule`` and running it;
  ``eager`` = the rest of the check: the eager forward and the comparison), and
  the rest of ``capture``.

Medians over the repeats are reported; ratios are medians of per-repeat ratios:

* ``ratio`` = build / export (two separate calls taken back to back; the
  export alone varies by +-30% between calls here, so this is noisy);
* ``staged ratio`` = (capture + probe + analyze + spec) / the export made inside that
  same capture: the same quantity without the call-to-call noise of export;
* ``analysis share`` = (analyze + spec) / export; ``check share`` = the
  eager-vs-graph check / export.
One untimed warm-up of each measurement per model comes first.

    python benchmarks/bench_spec.py                 # all models, 5 repeats
    python benchmarks/bench_spec.py --quick         # 2 repeats
    python benchmarks/bench_spec.py --models resnet20,vit --repeats 9
    python benchmarks/bench_spec.py --models gpt2 --profile 25   # cProfile of build_spec

By default torch runs with one intra-op thread (``--threads``): on a small
shared machine two OpenMP threads that meet a busy core spin at every parallel
region, which made a 30 ms ResNet20 forward take 0.8 s in our runs and turned
the check's two forwards into noise. Export and build run under the same setting.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import math
import os
import platform
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

import maskalign
from maskalign._utils.modes import mode_difference
from maskalign.spec import capture as capture_module
from maskalign.spec.permutation_spec import spec_from_analysis
from maskalign.spec.rules import analyze

Builder = Callable[[], tuple[nn.Module, tuple[Any, ...]]]

IMAGE = (2, 3, 32, 32)
TOKENS = (2, 16)
VOCAB = 128
TARGET_RATIO = 1.3


def _images() -> torch.Tensor:
    return torch.randn(*IMAGE, generator=torch.Generator().manual_seed(0))


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, TOKENS, generator=torch.Generator().manual_seed(0))


def _hf(model_cls: str, config_cls: str, inputs: Callable[[], torch.Tensor], **config: Any) -> Builder:
    def build() -> tuple[nn.Module, tuple[Any, ...]]:
        import transformers

        torch.manual_seed(0)
        cfg = getattr(transformers, config_cls)(**config)
        model = getattr(transformers, model_cls)(cfg).eval()
        return model, (inputs(),)

    return build


def _maskalign(name: str) -> Builder:
    def build() -> tuple[nn.Module, tuple[Any, ...]]:
        from maskalign import models

        torch.manual_seed(0)
        return getattr(models, name)().eval(), (_images(),)

    return build


def llama(layers: int) -> Builder:
    """Tiny LlamaForCausalLM: grouped-query attention (4 heads, 2 kv heads), rotary."""
    return _hf(
        "LlamaForCausalLM",
        "LlamaConfig",
        _tokens,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
    )


MODELS: dict[str, Builder] = {
    "resnet": _hf(
        "ResNetForImageClassification",
        "ResNetConfig",
        _images,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        num_labels=10,
    ),
    "convnext": _hf(
        "ConvNextForImageClassification",
        "ConvNextConfig",
        _images,
        num_stages=2,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        num_labels=10,
    ),
    "mobilenetv2": _hf(
        "MobileNetV2ForImageClassification",
        "MobileNetV2Config",
        _images,
        image_size=32,
        depth_multiplier=0.35,
        num_labels=10,
    ),
    "vit": _hf(
        "ViTForImageClassification",
        "ViTConfig",
        _images,
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=10,
    ),
    "bert": _hf(
        "BertModel",
        "BertConfig",
        _tokens,
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    ),
    "gpt2": _hf(
        "GPT2LMHeadModel",
        "GPT2Config",
        _tokens,
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "resnet20": _maskalign("ResNet20"),
    "vgg11": _maskalign("VGG11"),
}
SCALING = {f"llama-L{n}": llama(n) for n in (1, 2, 4, 8)}

STAGES = ("cap_export", "cap_graph", "cap_eager", "cap_other", "analyze", "spec")


# ---------------------------------------------------------------- measurements


def _clock(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def time_export(model: nn.Module, args: tuple[Any, ...]) -> float:
    def run() -> Any:
        with torch.no_grad():
            return torch.export.export(model, args, strict=False)

    return _clock(run)[0]


def time_build(model: nn.Module, args: tuple[Any, ...]) -> tuple[float, int]:
    seconds, spec = _clock(lambda: maskalign.build_spec(model, args))
    return seconds, len(spec.captured.graph.nodes)


@contextlib.contextmanager
def _instrumented(timers: dict[str, float]) -> Iterator[None]:
    """Time the export, the check and the graph run inside ``capture`` by
    wrapping them (benchmark-only monkeypatching, restored on exit)."""
    # _check_reproduces and CapturedGraph.run are internals of maskalign.spec.capture: if they
    # are renamed, the check columns read nan instead of the benchmark failing.
    export = torch.export.export
    check = getattr(capture_module, "_check_reproduces", None)
    run = getattr(capture_module.CapturedGraph, "run", None)

    def wrap(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[key] = timers.get(key, 0.0) + time.perf_counter() - start

        return timed

    torch.export.export = wrap("export", export)
    if check is not None:
        capture_module._check_reproduces = wrap("check", check)
    if run is not None:
        capture_module.CapturedGraph.run = wrap("graph", run)
    try:
        yield
    finally:
        torch.export.export = export
        if check is not None:
            capture_module._check_reproduces = check
        if run is not None:
            capture_module.CapturedGraph.run = run


def time_stages(model: nn.Module, args: tuple[Any, ...]) -> dict[str, float]:
    """One build_spec, stage by stage (the same calls build_spec makes)."""
    timers: dict[str, float] = {}
    with _instrumented(timers):
        t_capture, captured = _clock(lambda: capture_module.capture(model, args))
    t_probe, difference = _clock(lambda: mode_difference(model, args, {}))
    train = None
    t_train = 0.0
    if difference is not None:
        t_train, train = _clock(lambda: capture_module.capture(model, args, train=True, check=False))
    start = time.perf_counter()
    analysis = analyze(captured, train=train)
    t_analyze = time.perf_counter() - start
    start = time.perf_counter()
    spec_from_analysis(analysis, captured)
    t_spec = time.perf_counter() - start
    check, graph = timers.get("check", math.nan), timers.get("graph", math.nan)
    return {
        "cap_export": timers["export"],
        "cap_graph": graph,
        "cap_eager": check - graph,
        "cap_other": t_capture - timers["export"] - (0.0 if math.isnan(check) else check),
        "capture": t_capture,
        "probe": t_probe + t_train,
        "analyze": t_analyze,
        "spec": t_spec,
        "nodes": len(captured.graph.nodes),
    }


def benchmark(models: dict[str, Builder], repeats: int, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    built: dict[str, tuple[nn.Module, tuple[Any, ...]]] = {}
    for name, builder in models.items():
        model, args = builder()
        built[name] = (model, args)
        start = time.perf_counter()
        time_export(model, args)  # warm-up: first-call costs of export and of this model
        time_build(model, args)
        time_stages(model, args)
        log(f"  warm-up {name}: {time.perf_counter() - start:.1f}s")
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for r in range(repeats):
        start = time.perf_counter()
        for i, (name, (model, args)) in enumerate(built.items()):
            steps = ["export", "build", "stages"]
            if (r + i) % 2:
                steps.reverse()
            row: dict[str, float] = {}
            for step in steps:
                if step == "export":
                    row["export"] = time_export(model, args)
                elif step == "build":
                    row["build"], row["nodes"] = time_build(model, args)
                else:
                    row.update(time_stages(model, args))
            samples[name].append(row)
        log(f"  repeat {r + 1}/{repeats}: {time.perf_counter() - start:.1f}s")
    results: dict[str, dict[str, Any]] = {}
    for name, rows in samples.items():
        med = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        med["ratio"] = statistics.median(row["build"] / row["export"] for row in rows)
        med["share"] = statistics.median((row["analyze"] + row["spec"]) / row["export"] for row in rows)
        med["check_share"] = statistics.median((row["cap_graph"] + row["cap_eager"]) / row["export"] for row in rows)
        med["staged"] = statistics.median(
            (row["capture"] + row["probe"] + row["analyze"] + row["spec"]) / row["cap_export"] for row in rows
        )
        med["ratio_min"] = min(row["build"] / row["export"] for row in rows)
        med["ratio_max"] = max(row["build"] / row["export"] for row in rows)
        med["nodes"] = int(rows[0]["nodes"])
        results[name] = med
    return results


# ---------------------------------------------------------------- report


def machine() -> str:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = "absent"
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"machine: {platform.platform()}; {cpu}; cpu_count {os.cpu_count()} (usable {affinity}); "
        f"torch threads {torch.get_num_threads()}\n"
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {hf}, "
        f"maskalign {maskalign.__version__}; load average at start {load}"
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        "| model | nodes | export ms | build ms | ratio build/export (min-max) "
        "| capture ms = export + check graph + check eager + other | train-mode probe ms | staged ratio "
        "| analyze ms | spec ms "
        "| analysis share | check share | analyze ms/1k nodes |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        flag = "" if r["ratio"] <= TARGET_RATIO else " **miss**"
        lines.append(
            f"| {name} | {r['nodes']} | {_ms(r['export'])} | {_ms(r['build'])} | "
            f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}){flag} | "
            f"{_ms(r['capture'])} = {_ms(r['cap_export'])} + {_ms(r['cap_graph'])} + {_ms(r['cap_eager'])} + "
            f"{_ms(r['cap_other'])} | {_ms(r['probe'])} | {r['staged']:.2f} | {_ms(r['analyze'])} | "
            f"{_ms(r['spec'])} | {r['share']:.2f} | "
            f"{r['check_share']:.2f} | {r['analyze'] * 1e6 / r['nodes']:.1f} |"
        )
    return "\n".join(lines)


def scaling_fit(results: dict[str, dict[str, Any]]) -> str:
    """Least-squares line analyze_ms = a + b * nodes, and the largest model's build time."""
    xs = [r["nodes"] for r in results.values()]
    ys = [r["analyze"] * 1000 for r in results.values()]
    if len(xs) < 2:
        return ""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    syy = sum((y - my) ** 2 for y in ys)
    slope = sxy / sxx
    r2 = sxy * sxy / (sxx * syy) if syy else 1.0
    name, big = max(results.items(), key=lambda item: item[1]["nodes"])
    return (
        f"analyze ms = {my - slope * mx:.1f} + {slope * 1000:.1f} per 1000 nodes (R^2 {r2:.3f}); "
        f"build_spec of {name} ({big['nodes']} nodes): {big['build']:.2f}s (export {big['export']:.2f}s)"
    )


def profile(name: str, builder: Builder, top: int) -> str:
    """cProfile one build_spec (after a warm-up); the top entries by cumulative time."""
    model, args = builder()
    maskalign.build_spec(model, args)
    gc.collect()
    prof = cProfile.Profile()
    prof.enable()
    maskalign.build_spec(model, args)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    return f"--- cProfile of build_spec({name}) ---\n{out.getvalue()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of 5")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, --quick 2)")
    everything = ",".join([*MODELS, *SCALING])
    parser.add_argument("--models", default=everything, help=f"comma-separated subset of {everything}")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also print the top N cProfile entries of one build_spec per selected model",
    )
    opts = parser.parse_args(argv)
    repeats = opts.repeats or (2 if opts.quick else 5)
    selected = [m.strip() for m in opts.models.split(",") if m.strip()]
    unknown = [m for m in selected if m not in MODELS and m not in SCALING]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {everything}")
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    warnings.filterwarnings("ignore")
    with contextlib.suppress(ImportError):
        import transformers

        transformers.logging.set_verbosity_error()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    print(machine())
    print(f"repeats {repeats} (interleaved, medians), one warm-up each; inputs: images {IMAGE}, tokens {TOKENS}")
    wall = time.perf_counter()
    main_models = {m: MODELS[m] for m in selected if m in MODELS}
    scaling = {m: SCALING[m] for m in selected if m in SCALING}
    results = benchmark({**main_models, **scaling}, repeats, log)
    if main_models:
        print(f"\nbuild_spec vs one torch.export (target: ratio <= {TARGET_RATIO})")
        print(table({m: results[m] for m in main_models}))
        misses = [m for m in main_models if results[m]["ratio"] > TARGET_RATIO]
        print(f"target ratio <= {TARGET_RATIO}: " + (f"MISSED for {', '.join(misses)}" if misses else "met"))
    if scaling:
        print("\nscaling: tiny Llama (GQA 4 heads / 2 kv heads, rotary, hidden 64), 1-8 layers")
        print(table({m: results[m] for m in scaling}))
        print(scaling_fit({m: results[m] for m in scaling}) or "(one model: no fit)")
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"\ntotal {time.perf_counter() - wall:.0f}s; load average at end {load}")
    if opts.profile:
        for name in selected:
            print(profile(name, {**MODELS, **SCALING}[name], opts.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
