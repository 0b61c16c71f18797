"""Static report of every Triton kernel specialization, compiled for a GPU this machine need not have.

The library's host code is run on CPU tensors at the benchmark size (B=128, K=1000, 18x18 top-5
maps, 14x14 grid, MixToken; f32 / bf16 / f16 outputs and logits, odd K) with each kernel's launch
intercepted: nothing executes, but every launch's exact specialization (argument types, alignment
and divisibility attributes, constexprs, warps) is compiled for ``--arch`` (default sm_90) with
Triton's bundled ptxas. Printed per specialization: registers, spill bytes, shared memory,
instruction count and whether the SASS has 128-bit global stores (``STG.E.128``; ``st.global.v4``
in PTX when cuobjdump is unavailable).

    python -m tools.kernel_report            # table
    python -m tools.kernel_report --json r.json

Must run WITHOUT ``TRITON_INTERPRET`` (interpreted kernels are not compiled).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from contextlib import contextmanager

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("tools.kernel_report compiles kernels: run it without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from tl_fast.kernels import token_label_loss as tll  # noqa: E402
from tl_fast.kernels import token_targets as tt  # noqa: E402

KERNELS = {"class_rows_kernel": tt, "token_tile_kernel": tt, "token_long_rows_kernel": tt,
           "loss_token_fwd_kernel": tll, "loss_long_fwd_kernel": tll, "loss_long_bwd_kernel": tll,
           "loss_bwd_kernel": tll}


@contextmanager
def captured_launches(log: list):
    """Replace each kernel's ``run`` so that a launch records (name, args, kwargs) instead."""
    saved = {}
    for name, mod in KERNELS.items():
        fn = getattr(mod, name, None)
        if fn is None:
            continue
        saved[name] = (fn, fn.run)

        def run(*args, grid, warmup, _name=name, **kwargs):
            log.append((_name, args, kwargs, grid))
        fn.run = run
    try:
        yield
    finally:
        for name, (fn, orig) in saved.items():
            fn.run = orig


def compile_launch(name: str, args, kwargs, target: GPUTarget):
    """Compile one captured launch exactly as Triton's launcher would specialize it."""
    fn = getattr(KERNELS[name], name)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs)
    kwargs.setdefault("debug", False)
    kwargs.setdefault("instrumentation_mode", "")
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _tool(name: str) -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", name)


def resources(compiled, arch: str) -> dict:
    """Registers, spills (ptxas -v), shared memory and 128-bit stores of a compiled kernel."""
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
        cubin = os.path.join(tmp, "c.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = ""
        try:
            sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                                  check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            pass
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_st = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
    spill_ld = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
    stack = sum(int(x) for x in re.findall(r"(\d+) bytes stack frame", log))
    if sass:
        vec_stores = len(re.findall(r"STG\.E\.128", sass))
        n_instr = len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, flags=re.M))
        source = "sass"
    else:
        vec_stores = ptx.count("st.global.v4")
        n_instr = 0
        source = "ptx"
    return {"registers": regs, "spill_bytes": spill_st + spill_ld, "stack_bytes": stack,
            "shared_bytes": int(compiled.metadata.shared), "vector_stores": vec_stores, "instructions": n_instr,
            "stores_from": source, "warps": int(compiled.metadata.num_warps)}


def _inputs(bsz: int, num_classes: int, topk: int, size: int):
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(bsz, topk, size, size, generator=gen).half()
    indices = torch.randint(0, num_classes, (bsz, topk, size, size), generator=gen).to(torch.int16)
    affine = torch.tensor([[0.8, 0.0, 0.1], [0.0, 0.8, 0.1]]).expand(bsz, 2, 3).contiguous()
    return values, indices, affine


CASES = [
    # label, K, output / logits dtype, MixToken box
    ("K=1000 f32", 1000, torch.float32, (3, 2, 9, 10)),
    ("K=1000 bf16", 1000, torch.bfloat16, (3, 2, 9, 10)),
    ("K=1000 f16 per-sample box", 1000, torch.float16, "tensor"),
    ("K=999 f32 (odd K)", 999, torch.float32, None),
]


def specializations(bsz=128, topk=5, size=18, grid=(14, 14)) -> list[dict]:
    """Run every case's host code with launches captured; compile each distinct specialization."""
    rows = []
    for label, num_classes, dtype, box in CASES:
        values, indices, affine = _inputs(bsz, num_classes, topk, size)
        if box == "tensor":
            box = torch.tensor([[3, 2, 9, 10]], dtype=torch.int32).expand(bsz, 4).contiguous()
        log: list = []
        with captured_launches(log):
            tt.token_targets(values, indices, affine, num_classes=num_classes, grid=grid, smoothing=0.1,
                             mix_box=box, out_dtype=dtype)
            tokens = grid[0] * grid[1]
            cls = torch.zeros(bsz, num_classes, dtype=dtype)
            tok = torch.zeros(bsz, tokens, num_classes, dtype=dtype)
            spec = tll.LossSpec(num_classes, grid, 0.1, 1.0, 1.0, tt.mix_spec(box, bsz, values.device))
            _, state = tll.forward(cls, tok, values, indices, affine, spec)
            tll.backward(torch.ones((), dtype=torch.float32), cls, tok, values, indices, affine, state, spec)
        for name, args, kwargs, _grid in log:
            rows.append({"case": label, "kernel": name, "args": args, "kwargs": kwargs})
    return rows


# The tensor each kernel writes its dense rows into (for the vector width in bytes).
WRITTEN = {"class_rows_kernel": "out_ptr", "token_tile_kernel": "out_ptr", "token_long_rows_kernel": "out_ptr",
           "loss_token_fwd_kernel": "tok_ptr", "loss_long_fwd_kernel": "tok_ptr", "loss_bwd_kernel": "gtok_ptr",
           "loss_long_bwd_kernel": "gtok_ptr"}


def _written_element_size(row: dict) -> int:
    fn = getattr(KERNELS[row["kernel"]], row["kernel"])
    return row["args"][fn.arg_names.index(WRITTEN[row["kernel"]])].element_size()


def report(arch_cap: int = 90, only: str = "") -> list[dict]:
    """One row per (case, kernel) launch whose label contains ``only``; identical specializations
    (the class-row kernel serves targets and loss) are compiled once."""
    target = GPUTarget("cuda", arch_cap, 32)
    arch = f"sm_{arch_cap}a" if arch_cap == 90 else f"sm_{arch_cap}"
    out, seen = [], {}
    for row in specializations():
        if only and only not in f"{row['case']} {row['kernel']}":
            continue
        compiled = compile_launch(row["kernel"], row["args"], row["kwargs"], target)
        key = (row["kernel"], compiled.hash)
        if key in seen:
            continue
        seen[key] = True
        res = resources(compiled, arch)
        vec = int(row["kwargs"].get("VEC", 1))
        out.append({"case": row["case"], "kernel": row["kernel"], **res, "vec": vec,
                    "vec_bytes": vec * _written_element_size(row)})
    return out


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default 90)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--only", default="", help="only launches whose 'case kernel' label contains this")
    args = parser.parse_args(argv)
    rows = report(args.arch, args.only)
    print(f"Triton {triton.__version__}, target sm_{args.arch}; B=128 K=1000 (and 999) 18x18 top-5 14x14 grid")
    print(f"{'case':<28}{'kernel':<24}{'warps':>6}{'regs':>6}{'spill B':>8}{'smem B':>8}{'instr':>7}"
          f"{'vector':>8}{'128-bit st':>11}")
    for r in rows:
        print(f"{r['case']:<28}{r['kernel']:<24}{r['warps']:>6}{r['registers']:>6}{r['spill_bytes']:>8}"
              f"{r['shared_bytes']:>8}{r['instructions']:>7}{str(r['vec_bytes']) + ' B':>8}{r['vector_stores']:>11}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
