"""The report of ``python -m bench.latency``: terminal tables, the markdown document (with the
explanation written around one run's numbers) and the roofline plot's points. Measuring is
:mod:`bench.latency`'s; this module only formats what a run measured."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from bench import _common as common
from bench import roofline as rl
from contract.cli import md_table, text_table


def _f(v: Any, fmt: str = ".2f", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, fmt)


def _si(v: float) -> str:
    """3.7e9 -> '3.70 G', 2.5e-5 -> '25.0 u' (for FLOPs and seconds in sentences)."""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""), (1e-3, "m"), (1e-6, "u")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}"
    return f"{v * 1e9:.3g} n"


def _pct(v: Any) -> str:
    return _f(None if v is None else 100 * v, ".1f") + ("%" if v is not None else "")


def _x(v: Any) -> str:
    return _f(v, ".2f") + ("x" if v is not None else "")


@dataclass
class Report:
    env: dict[str, str]
    ceil: rl.Ceilings
    models: list[dict[str, Any]]
    twins: list[dict[str, Any]]
    ops: list[dict[str, Any]]
    sweep: list[dict[str, Any]]
    machine: dict[str, str]
    plot_path: str | None = None
    markdown_path: str | None = None

    # ---- tables shared by the terminal and the markdown

    def ceiling_table(self) -> tuple[list[str], list[list[str]]]:
        body = [[k, _f(v, ".2f" if "cores" in k else ".1f")] for k, v in self.ceil.detail.items()]
        body += [["peak fp32 (best matmul) GFLOP/s", _f(self.ceil.peak_gflops, ".1f")],
                 ["memory bandwidth (best DRAM copy) GB/s", _f(self.ceil.bandwidth_gbps, ".1f")],
                 ["ridge point FLOP/byte", _f(self.ceil.ridge, ".1f")]]
        return ["ceiling", "value"], body

    def model_table(self) -> tuple[list[str], list[list[str]]]:
        h = ["model", "bs", "prov", "params", "GFLOP", "MB moved", "FLOP/B", "ort ms", "ort p90", "GFLOP/s",
             "% peak", "% roof", "torch ms", "torch flt/call", "ort/torch"]
        body = [[r["model"], str(r["batch"]), r["provider"], f"{r['params'] / 1e6:.2f}M", _f(r["flops"] / 1e9, ".3f"),
                 _f(r["bytes"] / 1e6, ".1f"), _f(r["intensity"], ".1f"), _f(r["latency_ms"]), _f(r["latency_p90_ms"]),
                 _f(r["gflops"], ".1f"), _pct(r["peak_fraction"]), _pct(r["roof_fraction"]),
                 _f(r["torch_latency_ms"]), _f(r["torch_faults_per_call"], ".0f"), _x(r["ort_over_torch"])]
                for r in self.models]
        return h, body

    def twin_table(self) -> tuple[list[str], list[list[str]]]:
        h = ["depthwise model", "dense twin", "bs", "prov", "FLOPs ratio", "latency ratio", "gap (ort)",
             "ort p90/median", "torch latency ratio", "gap (torch)"]
        body = [[r["model"], r["twin"], str(r["batch"]), r["provider"], _f(r["flops_ratio"], ".3f"),
                 _f(r["latency_ratio"], ".3f"), _x(r["gap"]), _x(r["noise"]), _f(r["torch_latency_ratio"], ".3f"),
                 _x(r["torch_gap"])]
                for r in self.twins]
        return h, body

    def op_table(self) -> tuple[list[str], list[list[str]]]:
        h = ["model", "bs", "class", "nodes", "NCHWc", "FLOP share", "time share", "GFLOP", "FLOP/B", "ms/run",
             "GFLOP/s", "GB/s", "% roof"]
        body = [[r["model"], str(r["batch"]), r["op_class"], str(r["nodes"]),
                 f"{r['nchwc_nodes']}/{r['nodes']}" if r["nchwc_nodes"] is not None else "-", _pct(r["flop_share"]),
                 _pct(r["time_share"]), _f(r["flops"] / 1e9, ".4f"), _f(r["intensity"], ".1f"),
                 _f(r["latency_ms"], ".3f"),
                 _f(r["gflops"], ".1f"), _f(r["gbps"], ".1f"), _pct(r["roof_fraction"])]
                for r in self.ops]
        return h, body

    def sweep_table(self) -> tuple[list[str], list[list[str]]]:
        h = ["groups", "bs", "class", "NCHWc", "GEMM/group MxK", "GFLOP", "FLOP/B", "ort ms", "GFLOP/s", "% peak",
             "% roof", "torch ms", "torch GFLOP/s", "FLOPs ratio", "latency ratio", "gap (ort)", "gap (torch)"]
        body = []
        for r in self.sweep:
            c = self._sweep_channels()
            g = r["groups"]
            body.append([str(g), str(r["batch"]), r["op_class"], "yes" if r["nchwc_nodes"] else "no",
                         f"{c // g}x{c // g * 9}", _f(r["flops"] / 1e9, ".4f"),
                         _f(r["intensity"], ".1f"), _f(r["latency_ms"], ".3f"), _f(r["gflops"], ".1f"),
                         _pct(r["peak_fraction"]), _pct(r["roof_fraction"]), _f(r["torch_latency_ms"], ".3f"),
                         _f(r["torch_gflops"], ".1f"), _f(r["flops_ratio"], ".4f"), _f(r["latency_ratio"], ".4f"),
                         _x(r["gap"]), _x(r["torch_gap"])])
        return h, body

    def _sweep_channels(self) -> int:
        return int(self.sweep[0]["name"].split()[1].split("->")[0]) if self.sweep else 0

    def terminal(self) -> str:
        parts = [f"== machine ceilings ({self.env['threads']})", text_table(*self.ceiling_table()),
                 "", "== models (FLOPs: a multiply-add is 2 FLOPs; MB moved: weights + activations read and written "
                 "once; latency: median)", text_table(*self.model_table())]
        if self.twins:
            parts += ["", "== depthwise vs dense twin (gap = latency ratio / FLOPs ratio: cost of a FLOP, "
                          "depthwise over dense)", text_table(*self.twin_table())]
        parts += ["", "== per operator class (onnxruntime profile; shapes from onnx shape inference at the batch)",
                  text_table(*self.op_table())]
        if self.sweep:
            parts += ["", f"== sweep: {self.sweep[0]['name'].rsplit(' ', 1)[0]} (ratios against groups=1)",
                      text_table(*self.sweep_table())]
        return "\n".join(parts)

    # ---- roofline points

    def points(self) -> list[rl.Point]:
        dw_models = {r["model"] for r in self.models if r["twin"]}
        pts = []
        for r in self.models:
            if r["provider"] == "cpu" and r["gflops"]:
                pts.append(rl.Point(f"{r['model']} bs{r['batch']}", r["intensity"], r["gflops"], "model",
                                    r["model"] in dw_models))
        for r in self.ops:
            if r["provider"] == "cpu" and r["gflops"] and r["intensity"]:
                pts.append(rl.Point(f"{r['model']} bs{r['batch']} {r['op_class']}", r["intensity"], r["gflops"], "op",
                                    r["model"] in dw_models, r["op_class"]))
        for r in self.sweep:
            if r["provider"] == "cpu" and r["gflops"]:
                pts.append(rl.Point(f"g{r['groups']} bs{r['batch']}", r["intensity"], r["gflops"], "sweep",
                                    r["op_class"] == "depthwise", r["op_class"]))
        return pts

    # ---- markdown

    def markdown(self) -> str:
        e = self.env
        out = ["# Depthwise convolution: FLOPs in theory, time in practice", "",
               "Generated by `bench.latency` from the numbers of one run; rerun the command to refresh it.", ""]
        if e.get("note"):
            out += [f"> {e['note']}", ""]
        if self._busy():
            out += [f"> **Warning: recorded on a busy machine** (load average {e['load_start']} at the start, "
                    f"{e.get('load_end', '?')} at the end, this run's own {e.get('threads_n', '?')} threads "
                    f"included, on {self.machine.get('cores')} cores). Other processes "
                    "took CPU time from this run: its latencies are too high and its ratios unreliable. Rerun it "
                    "with nothing else running.", ""]
        out += ["## How it was measured", "",
                f"- Command: `{e['command']}`",
                f"- Started {e['started']}, took {e.get('elapsed_s', '?')} s; {e['versions']}.",
                f"- Machine: {e['machine']}. Load average (1, 5, 15 min) {e['load_start']} at the start and "
                f"{e.get('load_end', '?')} at the end, on {self.machine.get('cores')} cores: "
                + ("**the machine was shared**" if self._busy() else "no sign of other load")
                + f"; the {e['threads_n']}-thread matmul of the ceilings got {e.get('cpu_obtained', '?')} cores' worth "
                f"of CPU time; this process ran at nice {e['nice']}.",
                f"- Threads: {e['threads']}.",
                f"- glibc malloc: {e['malloc']}. Minor page faults per call are recorded next to every latency.",
                f"- Timing: {e['timing']}. Models are the exported, BatchNorm-folded ONNX files (random "
                "initialisation); PyTorch eager runs the same folded model under `torch.inference_mode()`.",
                "- FLOPs count a multiply-add as 2 FLOPs (conv and GEMM; norms, activations and pooling are not in "
                "a model's FLOPs). Minimum bytes: every weight read once, the input read once, the output written "
                "once, every intermediate tensor written once and read once (fp32). Arithmetic intensity = FLOPs / "
                "minimum bytes. The roof at intensity I is min(peak, bandwidth x I).",
                "- Noise: the same configuration's median moved by up to 1.7x within two minutes on this machine "
                "(docs/benchmarking.md); compare only numbers of the same run. Differences under ~20% are noise.", "",
                "## Machine ceilings", "", md_table(*self.ceiling_table()), "",
                f"The ridge point is {self.ceil.ridge:.1f} FLOP/byte: an operator with fewer FLOPs per byte than that "
                f"cannot reach {self.ceil.peak_gflops:.0f} GFLOP/s even with perfect code; its roof is "
                f"{self.ceil.bandwidth_gbps:.1f} GB/s x its intensity. That roof is DRAM's; data that stays in L3 "
                f"moves at up to {_f(self.ceil.cache_gbps, '.0f')} GB/s, which is why a small model or operator can "
                "show more than 100% of the roof below.", ""]
        over = [r for r in self.models + self.ops + self.sweep
                if r["provider"] == "cpu" and (r["peak_fraction"] or 0) > 1]
        if over:
            top = max(over, key=lambda r: r["peak_fraction"])
            out += [f"{len(over)} measurement{'s exceed' if len(over) > 1 else ' exceeds'} the measured peak "
                    f"(highest: {top['name']} at batch {top['batch']}, "
                    f"{top['peak_fraction']:.0%}): the ceilings are the best of many tries at the start and the end, "
                    "but on a shared machine even that can fall in a busy moment, so read the peak as a lower bound "
                    "and compare percentages within this run only.", ""]
        out += ["## Models", "", md_table(*self.model_table()), ""]
        slow = [r for r in self.models if r["ort_over_torch"] is not None and r["ort_over_torch"] < 0.2]
        if slow and int(e.get("threads_n", "1")) > 1:
            worst = min(slow, key=lambda r: r["ort_over_torch"])
            out += [f"PyTorch eager took more than 5x onnxruntime's time on {len(slow)} of {len(self.models)} rows "
                    f"(worst: {worst['model']} at batch {worst['batch']}, {worst['torch_latency_ms']:.1f} ms against "
                    f"{worst['latency_ms']:.2f} ms). PyTorch runs each operator as an OpenMP parallel region with "
                    f"{e['threads_n']} threads that all must finish; when another process holds a core, every region "
                    "waits for the descheduled thread, and the small models, made of many tiny regions, pay that "
                    "wait hundreds of times per call. onnxruntime's thread pool hands work out in smaller pieces, so "
                    "the threads that are running pick up the share of one that is not. Rerun with `--threads 1` to "
                    "see PyTorch without that wait.", ""]
        if self.twins:
            out += ["## The gap in one number", "",
                    "`gap` = (latency of the depthwise net / latency of its dense twin) / "
                    "(FLOPs of the depthwise net / "
                    "FLOPs of its twin): how many times more a FLOP costs in the depthwise net. 1.0 would mean "
                    "time follows FLOPs. `ort p90/median`: the worse of the two models' p90 over median, a "
                    "measure of how much the machine disturbed this pair (above ~1.5x, read the gap with care).", "",
                    md_table(*self.twin_table()), ""]
            out += [f"- {r['note']} at batch {r['batch']} ({r['provider']}): gap **{r['gap']:.2f}x**"
                    + (f" (PyTorch eager {r['torch_gap']:.2f}x)" if r["torch_gap"] else "") + "." for r in self.twins]
            out.append("")
        out += ["## Where the time goes, per operator class", "",
                "onnxruntime's own profile (`SessionOptions.enable_profiling`), kernel time per run, mapped back to "
                "the exported graph's nodes. Conv classes come from the node's `group` attribute and weight shape "
                "(group = input channels: depthwise; 1 < group < channels: grouped; 1x1: pointwise; else dense). "
                "onnxruntime fuses ReLUs and residual adds into the conv before them, so their time counts there; "
                "`other` also holds the NCHWc layout reorders it inserts. FLOPs of `other` count one per output "
                "element of elementwise ops and are not part of a model's FLOPs above.", "",
                md_table(*self.op_table()), ""]
        if self.sweep:
            out += ["## One convolution, five group counts", "",
                    f"{self.sweep[0]['name'].rsplit(' ', 1)[0]}, no bias. "
                    "`GEMM/group MxK`: the matrix product each group "
                    "becomes after im2col (M output channels by K = input channels x 9 taps, times N = batch x "
                    "pixels columns).", "", md_table(*self.sweep_table()), ""]
        out += ["## Why depthwise runs slower than its FLOPs say", ""]
        out += self.explanation()
        if self.plot_path:
            rel = self.plot_path
            if self.markdown_path:
                rel = os.path.relpath(os.path.abspath(self.plot_path),
                                      os.path.dirname(os.path.abspath(self.markdown_path)))
            out += ["", "## Roofline", "",
                    f"![roofline]({rel})", "",
                    "Stars: models (red: depthwise variants, blue: dense twins); small markers: operator classes of "
                    "each model (triangle depthwise, square grouped, diamond pointwise, circle dense, plus GEMM, "
                    "x other); hexagons: the single-conv sweep."]
        return "\n".join(out) + "\n"

    def _busy(self) -> bool:
        """Other processes' load above half the cores at the start or the end, or the ceilings' matmul
        got under 90% of its threads' CPU time. Half, not all: a 1-minute load of 1 on 2 cores already
        means one core was taken. The load at the end includes this run's own threads (up to one per
        core), so they are taken off it first."""
        cores = float(self.machine.get("cores", "1") or 1)
        threads = float(self.env.get("threads_n", "0") or 0)
        try:
            start = float(self.env["load_start"].split()[0])
            end_fields = self.env.get("load_end", "").split()
            end = float(end_fields[0]) - min(threads, cores) if end_fields else 0.0
            busy = max(start, end) > cores / 2
        except (ValueError, IndexError):
            busy = False
        if self.ceil.cpu_cores and threads:
            busy = busy or self.ceil.cpu_cores < 0.9 * threads
        return busy

    def explanation(self) -> list[str]:
        """The textbook answer, written around this run's numbers."""
        c = self.ceil
        out: list[str] = []
        sweep_cpu = [r for r in self.sweep if r["provider"] == "cpu"]
        b1 = [r for r in sweep_cpu if r["batch"] == min(s["batch"] for s in sweep_cpu)] if sweep_cpu else []
        dense = next((r for r in b1 if r["groups"] == 1), None)
        dw = next((r for r in b1 if r["op_class"] == "depthwise"), None)
        ops = [r for r in self.ops if r["provider"] == "cpu"]
        dw_ops = [r for r in ops if r["op_class"] == "depthwise" and r["gflops"]]
        ch = self._sweep_channels()

        p = ["**1. Arithmetic intensity puts depthwise under the memory roof.**"]
        if dense and dw:
            p.append(
                f"The dense 3x3 conv of the sweep does {dense['flops'] / 1e9:.2f} GFLOP "
                f"on {dense['bytes'] / 1e6:.1f} MB "
                f"({dense['intensity']:.0f} FLOP/byte, right of the {c.ridge:.1f} FLOP/byte ridge): it is "
                f"compute-bound and ran at {dense['gflops']:.0f} GFLOP/s ({dense['peak_fraction']:.0%} of peak). "
                f"The depthwise one does {dw['flops_ratio']:.4f}x the FLOPs ({dw['flops'] / 1e6:.1f} MFLOP) but "
                f"reads and writes the same activations ({dw['bytes'] / 1e6:.1f} MB), so its intensity falls to "
                f"{dw['intensity']:.2f} FLOP/byte. Under the memory roof the best it could do is "
                f"{c.bandwidth_gbps:.1f} GB/s x {dw['intensity']:.2f} = {dw['roof_gflops']:.0f} GFLOP/s; it ran at "
                f"{dw['gflops']:.1f} GFLOP/s. {1 / dw['flops_ratio']:.0f}x fewer FLOPs bought "
                f"{1 / dw['latency_ratio']:.1f}x less time (gap {dw['gap']:.1f}x).")
        if dw_ops:
            p.append(f"In the depthwise models the depthwise convs sit at "
                     f"{min(r['intensity'] for r in dw_ops):.2f}-{max(r['intensity'] for r in dw_ops):.2f} FLOP/byte, "
                     f"below the ridge, and reached {min(r['gflops'] for r in dw_ops):.1f}-"
                     f"{max(r['gflops'] for r in dw_ops):.1f} GFLOP/s against a peak of {c.peak_gflops:.0f}.")
        if dw and dw["roof_fraction"] is not None and dw["roof_fraction"] < 0.7:
            p.append("Intensity alone is not the whole story: the depthwise conv reached only "
                     f"{dw['roof_fraction']:.0%} of its memory roof (points 2-4 are why).")
        out += [" ".join(p), ""]

        if b1:
            p = ["**2. The GEMM shapes vectorise poorly.** Lowered to matrix products (im2col), each of the g groups "
                 f"of a {ch}->{ch} 3x3 conv is an M x K = {ch}/g x 9*{ch}/g weight matrix times a K x N patch matrix "
                 "(N = batch x output pixels). Each patch value brought into a register is reused once per output "
                 "channel of its group, M times:"]
            p.append("; ".join(f"groups={r['groups']}: M x K = {ch // r['groups']}x{ch // r['groups'] * 9}, "
                               f"{r['gflops']:.0f} GFLOP/s" for r in b1) + ".")
            p.append("A GEMM micro-kernel keeps a tile of several output rows by a few SIMD vectors of columns in "
                     "registers and streams K through it; with M = 1 and K = 9 nearly all of the tile is empty and "
                     f"every FMA waits on its own load (this CPU: {self.machine.get('simd', '?')}). onnxruntime's MLAS "
                     "therefore has a separate direct kernel for depthwise in its blocked NCHWc layout, which fills "
                     "the SIMD lanes with channels instead; but each loaded input value still feeds at most 9 "
                     f"multiply-adds (one per tap of its own channel), against {ch} x 9 = {ch * 9} for the dense conv.")
            grouped = [r for r in ops if r["op_class"] == "grouped" and r["nodes"]]
            if grouped:
                parts = [f"{r['model']} bs{r['batch']}: {r['nchwc_nodes']} of {r['nodes']}" for r in grouped]
                p.append("Grouped convs only take the NCHWc path when their channels per group fill the layout's "
                         "channel block; the others run per-group im2col + GEMM in plain NCHW, with layout reorders "
                         f"around them. Grouped convs in NCHWc in this run: {'; '.join(parts)}.")
            out += [" ".join(p), ""]

        if b1:
            p = ["**3. Per-group loop overhead.** Time beyond what both roofs allow, spread over the groups "
                 "(excess = latency - max(FLOPs / peak, bytes / DRAM bandwidth)):"]
            items = []
            for r in b1:
                g = r["groups"]
                floor_ms = max(r["flops"] / c.peak_gflops / 1e6, r["bytes"] / c.bandwidth_gbps / 1e6)
                excess = max(0.0, r["latency_ms"] - floor_ms)
                items.append(f"groups={g}: {_si(r['flops'] / g)}FLOP in {_si(r['latency_ms'] / 1e3 / g)}s per group, "
                             f"{excess / r['latency_ms']:.0%} of the time above the roofs")
            p.append("; ".join(items) + ".")
            p.append("Each small problem keeps its fixed costs (pointer and loop-bound set-up, a partly filled "
                     "SIMD vector at every row end and padding edge, thread-pool hand-offs) while its work shrinks "
                     "by g; the layout reorders onnxruntime inserts around convs it cannot block are the same kind "
                     "of cost, paid per layer:")
            reord = [r for r in ops if r["op_class"] == "other" and r.get("reorder_ms")]
            p.append("; ".join(f"{r['model']} bs{r['batch']} {r['reorder_ms']:.2f} ms/run" for r in reord) + "."
                     if reord else "none were needed in this run.")
            out += [" ".join(p), ""]

        l2 = common.parse_size(self.machine["L2"]) if self.machine.get("L2") else None
        l3 = common.parse_size(self.machine["L3"]) if self.machine.get("L3") else None
        p = ["**4. Cache behaviour.**"]
        if dw:
            p.append(f"The sweep's depthwise conv touches {dw['bytes'] / 2**20:.1f} MiB at batch {dw['batch']}"
                     + (f" (L2 {l2 / 2**20:.1f} MiB per core, L3 {l3 / 2**20:.0f} MiB)" if l2 and l3 else "")
                     + f" and moved it at {dw['gbps']:.1f} GB/s: a large DRAM copy runs at {c.bandwidth_gbps:.1f} GB/s "
                     f"and a copy inside L3 at {_f(c.cache_gbps, '.0f')} GB/s.")
        p.append("A dense conv reuses every input pixel it loads for all output channels while it sits in L1; a "
                 "depthwise conv reuses it only for the 9 outputs of the same channel around it, so its data "
                 "streams through the caches once with little to hide the latency behind.")
        if dw_ops:
            for_b = {}
            for r in dw_ops:
                for_b.setdefault(r["batch"], []).append(r["gbps"] or 0)
            if len(for_b) > 1:
                p.append("Depthwise convs moved " + ", ".join(
                    f"{min(v):.1f}-{max(v):.1f} GB/s at batch {b}" for b, v in sorted(for_b.items()))
                    + " in the models: whether that beats the DRAM roof depends on the working set fitting in cache.")
        out += [" ".join(p), ""]

        if self.twins:
            p = ["**5. In whole networks.**"]
            for t in self.twins:
                mine = {r["op_class"]: r for r in ops if r["model"] == t["model"] and r["batch"] == t["batch"]}
                theirs = {r["op_class"]: r for r in ops if r["model"] == t["twin"] and r["batch"] == t["batch"]}
                line = (f"{t['model']} at batch {t['batch']}: {t['flops_ratio']:.0%} of {t['twin']}'s FLOPs, "
                        f"{t['latency_ratio']:.0%} of its time, gap {t['gap']:.2f}x")
                dwo = mine.get("depthwise")
                if dwo and dwo["flop_share"] is not None and dwo["time_share"] is not None:
                    line += (f"; its depthwise convs are {dwo['flop_share']:.1%} of its FLOPs and "
                             f"{dwo['time_share']:.1%} of its kernel time")
                gro = theirs.get("grouped")
                if gro and gro["flop_share"] is not None and gro["time_share"] is not None:
                    what = ("Here the depthwise net wins per FLOP because what it replaced was worse" if t["gap"] < 0.9
                            else "What it replaced was no better")
                    line += (f". {what}: the twin's grouped convs were {gro['flop_share']:.1%} of its FLOPs but "
                             f"{gro['time_share']:.1%} of its time ({gro['gflops']:.0f} GFLOP/s; {gro['nchwc_nodes']} "
                             f"of {gro['nodes']} in NCHWc)")
                elif t["gap"] > 1.1:
                    rest = [f"{c} {mine[c]['time_share']:.0%}" for c in ("pointwise", "other") if c in mine
                            and mine[c]["time_share"] is not None]
                    if rest:
                        line += f"; the time stays in what depthwise does not shrink ({', '.join(rest)} of its time)"
                if t["noise"] and t["noise"] > 1.5:
                    line += f" (noisy pair: p90 {t['noise']:.1f}x the median)"
                p.append(line + ".")
            p.append("Depthwise only removes FLOPs from the 3x3 convs; the pointwise convs, the memory-bound layers "
                     "and the per-layer fixed costs stay, so a net's time falls by less than its FLOPs unless the "
                     "convs it replaces ran worse than depthwise does.")
            out += [" ".join(p), ""]
        return out
