#!/usr/bin/env python3
"""Makes a copy of torch-sys whose C++ wrappers compile against an older libtorch.

tch's generated wrappers (libtch/torch_api_generated.cpp) call every ATen operator of the
libtorch version that tch binds. An older libtorch lacks a few of them (torch 2.11.0 against
tch 0.26: 14 of 2,595). This script compiles the file with -fsyntax-only against the given
torch's headers and replaces the body of each wrapper that does not compile with one that
raises a C++ exception ("not in libtorch X"), which tch reports as an error if it is ever
called. geomx calls none of them. It repeats until the file compiles (at most 4 passes).

    torch-sys-compat.py <torch-sys source dir> <output dir> <python with torch>

Used by scripts/gpu-prepare.sh for GEOMX_GPU_TORCH other than the version tch binds; the copy
is used through cargo's `--config patch.crates-io.torch-sys.path=...` and never committed.
"""
import os
import re
import shutil
import subprocess
import sys


def torch_info(python):
    out = subprocess.run(
        [python, "-c",
         "import torch, os; d = os.path.dirname(torch.__file__);"
         "print(torch.__version__.split('+')[0]); print(d);"
         "print(int(torch.compiled_with_cxx11_abi()))"],
        check=True, capture_output=True, text=True).stdout.split("\n")
    return out[0], out[1], out[2]


def failing_lines(src, torch_dir, abi):
    cmd = ["g++", "-fsyntax-only", "-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           "-DGLOG_USE_GLOG_EXPORT", "-w", "-I", os.path.join(src, "libtch"),
           "-I", os.path.join(torch_dir, "include"),
           "-I", os.path.join(torch_dir, "include", "torch", "csrc", "api", "include"),
           os.path.join(src, "libtch", "torch_api_generated.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = set(int(m) for m in re.findall(r"torch_api_generated\.cpp:(\d+):\d+: error", r.stderr))
    if r.returncode != 0 and not lines:
        sys.exit("g++ failed without errors in torch_api_generated.cpp:\n" + r.stderr[-3000:])
    return lines


def stub(path, bad_lines, version):
    text = open(path).read().split("\n")
    starts = [i for i, l in enumerate(text) if re.match(r"^[a-z_0-9 *]+ atg_\w+\(", l)]
    done = []
    for line in sorted(bad_lines):
        i = line - 1
        begin = max((s for s in starts if s <= i), default=None)
        if begin is None:
            sys.exit(f"error at line {line} outside any wrapper")
        end = begin
        while text[end] != "}":
            end += 1
        name = re.search(r"(atg_\w+)\(", text[begin]).group(1)
        if name in done:
            continue
        body = [f'  PROTECT(throw std::runtime_error("{name}: not in libtorch {version}");)']
        text[begin + 1:end] = body + [""] * (end - begin - 1 - len(body))
        done.append(name)
    open(path, "w").write("\n".join(text))
    return done


def main():
    src_in, out, python = sys.argv[1:4]
    version, torch_dir, abi = torch_info(python)
    if os.path.exists(out):
        shutil.rmtree(out)
    shutil.copytree(src_in, out)
    gen = os.path.join(out, "libtch", "torch_api_generated.cpp")
    stubbed = []
    for _ in range(4):
        bad = failing_lines(out, torch_dir, abi)
        if not bad:
            print(f"torch-sys-compat: {len(stubbed)} wrappers stubbed for libtorch {version}: "
                  + ", ".join(stubbed), file=sys.stderr)
            return
        stubbed += stub(gen, bad, version)
    sys.exit("torch_api_generated.cpp still does not compile after 4 passes")


if __name__ == "__main__":
    main()
