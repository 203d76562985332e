"""``make embedded-check``: the exported airline model on a Cortex-M4F, emulated by QEMU.

    python -m gru_engine.bench.embedded [--model BUNDLE_OR_KERAS] [--out DIR]

For float32 and int8 weights: export the model with ``export_c``, cross-compile it with a small
bare-metal harness (vector table, FPU on, semihosting output; no C library start-up) for
``-mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 -Os``, run it on QEMU's
``mps2-an386`` board, and compare what it prints (``NAME_self_check``, then ``NAME_predict`` and
``NAME_step`` on a fixed input, as exact float bits) with the engine. Prints flash and RAM use, and
the instructions a step executes (QEMU's ``-icount`` mode, a proxy for the core's cycles).

The model: ``--model``, else ``demo-out/tutorial.gru.safetensors`` when ``make demo`` has run, else
the benchmark's airline network (Keras's initial weights from a fixed seed).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TOOLS = ("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm")
CPU_FLAGS = ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16")
FLAGS = ("-std=c99", "-Os", "-ffunction-sections", "-fdata-sections", "-Wall", "-Wextra", "-Werror")
STEPS = 10
NAME = "airline"
# mps2-an386's SysTick counts at 25 MHz, and under -icount shift=0 QEMU's clock advances 1 ns per
# instruction: a tick is 40 instructions.
INSTRUCTIONS_PER_TICK = 40
QEMU_SECONDS = 300

LINKER_SCRIPT = """/* mps2-an386: 4 MB SSRAM1 at 0 (holds the image, as flash would), 4 MB SSRAM2 at 0x20000000. */
MEMORY
{
    FLASH (rx)  : ORIGIN = 0x00000000, LENGTH = 4M
    RAM   (rwx) : ORIGIN = 0x20000000, LENGTH = 4M
}
ENTRY(reset_handler)
SECTIONS
{
    .text : { KEEP(*(.vectors)) *(.text*) *(.rodata*) . = ALIGN(4); } > FLASH
    .ARM.exidx : { *(.ARM.exidx*) } > FLASH
    _data_load = LOADADDR(.data);
    .data : { _data_start = .; *(.data*) . = ALIGN(4); _data_end = .; } > RAM AT > FLASH
    .bss (NOLOAD) : { _bss_start = .; *(.bss*) *(COMMON) . = ALIGN(4); _bss_end = .; } > RAM
    _stack_top = ORIGIN(RAM) + LENGTH(RAM);
}
"""

HARNESS = r"""/* Bare-metal harness: runs the model once and prints through semihosting. */
#include <stdint.h>
#include <string.h>
#include "{name}.h"

extern uint32_t _data_load, _data_start, _data_end, _bss_start, _bss_end, _stack_top;
int main(void);
void reset_handler(void);
void fault_handler(void);

__attribute__((section(".vectors"), used))
static const uintptr_t vectors[16] = {{
    (uintptr_t)&_stack_top, (uintptr_t)reset_handler, (uintptr_t)fault_handler, (uintptr_t)fault_handler,
    (uintptr_t)fault_handler, (uintptr_t)fault_handler, (uintptr_t)fault_handler,
}};

static int semihost(int operation, const void *argument)
{{
    register int r0 __asm__("r0") = operation;
    register const void *r1 __asm__("r1") = argument;
    __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}}

static void put(const char *text) {{ semihost(0x04, text); }}  /* SYS_WRITE0 */

static void exit_with(int failed)  /* SYS_EXIT: ApplicationExit (QEMU exits 0) or RunTimeErrorUnknown (1) */
{{
    semihost(0x18, (const void *)(uintptr_t)(failed ? 0x20023 : 0x20026));
    for (;;) {{
    }}
}}

void fault_handler(void) {{ put("fault\n"); exit_with(1); }}

static void put_hex(const char *label, uint32_t bits)
{{
    char line[32];
    int i;
    strcpy(line, label);
    for (i = 0; i < 8; i++)
        line[strlen(label) + (size_t)i] = "0123456789abcdef"[(bits >> (28 - 4 * i)) & 15u];
    line[strlen(label) + 8] = '\n';
    line[strlen(label) + 9] = '\0';
    put(line);
}}

static void put_float(const char *label, float value)  /* exact: the float's bits in hex */
{{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    put_hex(label, bits);
}}

void reset_handler(void)
{{
    uint32_t *word;
    const uint32_t *source = &_data_load;
    for (word = &_data_start; word < &_data_end; word++)
        *word = *source++;
    for (word = &_bss_start; word < &_bss_end; word++)
        *word = 0;
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20;  /* CPACR: full access to CP10 and CP11, the FPU */
    __asm__ volatile("dsb\n\tisb");
    exit_with(main());
}}

/* SysTick, counting down from 2^24 - 1 on the processor clock. Under QEMU's -icount the clock
   advances with each instruction executed, so its ticks count instructions (a proxy for cycles). */
#define SYST_CSR (*(volatile uint32_t *)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018u)

static const float input[{steps} * {upper}_INPUT_FEATURES] = {{ {values} }};
static float work[{work_floats}];

int main(void)
{{
    float y[{steps} * {upper}_OUTPUT_FEATURES], error;
    {name}_state state;
    size_t t, i;
    const int status = {name}_self_check(&error);
    put_float("self_check_error ", error);
    put(status == 0 ? "self_check pass\n" : "self_check FAIL\n");
    {name}_predict(input, {steps}, y, work);
    for (i = 0; i < ({upper}_OUTPUT_IS_SEQUENCE ? {steps} : 1) * {upper}_OUTPUT_FEATURES; i++)
        put_float("predict ", y[i]);
    {name}_reset(&state);
#if {upper}_CAN_STREAM
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0u;
    SYST_CSR = 5u;  /* enabled, processor clock, no interrupt */
    for (t = 0; t < {steps}; t++) {{
        const uint32_t start = SYST_CVR;
        {name}_step(&state, input + t * {upper}_INPUT_FEATURES, y);
        put_hex("step_ticks ", (start - SYST_CVR) & 0xFFFFFFu);
        for (i = 0; i < {upper}_OUTPUT_FEATURES; i++)
            put_float("step ", y[i]);
    }}
#else
    (void)t;
#endif
    return status != 0;
}}
"""


def install_hint() -> str:
    return "apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm"


def airline_model(path: str | None):
    """A ModelSpec: --model, the demo's trained bundle, or the benchmark's airline network."""
    from gru_engine import bundle
    from gru_engine.exporters.c_writer import resolve_model
    if path:
        return resolve_model(path)
    trained = Path("demo-out/tutorial.gru.safetensors")
    if trained.is_file():
        return bundle.read(trained), f"bundle {trained}"
    from .workloads import airline_recipe
    recipe = airline_recipe()
    return resolve_model(recipe.build())[0], f"the benchmark's airline network ({recipe.describe()})"


def fixed_input(spec) -> np.ndarray:
    """(STEPS, F): a smooth positive series, valid for every transform (log needs > 0); for a model
    with transforms (which take the user's units) scaled like the airline's passengers."""
    t = np.arange(STEPS, dtype=np.float64)[:, None]
    features = np.arange(spec.input_features, dtype=np.float64)[None, :]
    return (1.5 + np.sin(0.7 * t + features)).astype(np.float32) * (
        np.float32(300.0) if spec.transforms else np.float32(1.0))


def stack_bytes(directory: Path, entry: str) -> int | None:
    """Stack of a public function and every helper it may call, from GCC's -fstack-usage (.su)
    file: the helpers form one call chain below it, so the sum is a safe upper bound."""
    frames = {}
    for line in (directory / f"{NAME}.su").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[-2].isdigit():
            frames[parts[0].rsplit(":", 1)[-1]] = int(parts[-2])
    if f"{NAME}_{entry}" not in frames:  # no NAME_step for a model that cannot stream
        return None
    helpers = sum(size for function, size in frames.items() if not function.startswith(NAME + "_"))
    return frames[f"{NAME}_{entry}"] + helpers


def run_one(spec, weights: str, directory: Path) -> dict:
    from gru_engine.exporters import export_c
    from gru_engine.exporters.c_writer import dequantized
    from gru_engine.runtime import Model
    from gru_engine.spec import max_excess

    result = export_c(spec, directory, name=NAME, weights=weights, object_report=False)
    x = fixed_input(spec)
    report = result.report
    work_floats = STEPS * report["work_floats_per_step"] + report["work_floats_fixed"]
    harness = HARNESS.format(name=NAME, upper=NAME.upper(), steps=STEPS, work_floats=work_floats,
                             values=", ".join(f"{float(v)!r}f" for v in x.ravel()))
    (directory / "main.c").write_text(harness)
    (directory / "link.ld").write_text(LINKER_SCRIPT)
    elf = directory / f"{NAME}-{weights}.elf"
    compile_flags = [*CPU_FLAGS, *FLAGS, f"-I{directory}"]
    subprocess.run(["arm-none-eabi-gcc", *compile_flags, "-fstack-usage", "-c", str(directory / f"{NAME}.c"),
                    "-o", str(directory / f"{NAME}.o")], check=True, cwd=directory)
    subprocess.run(["arm-none-eabi-gcc", *compile_flags, "-nostartfiles", "--specs=nano.specs", "--specs=nosys.specs",
                    "-Wl,--gc-sections", "-T", str(directory / "link.ld"), str(directory / "main.c"),
                    str(directory / f"{NAME}.o"), "-lm", "-o", str(elf)], check=True, cwd=directory)
    sizes = _sizes(directory / f"{NAME}.o")
    run = subprocess.run(["qemu-system-arm", "-M", "mps2-an386", "-nographic", "-monitor", "none",
                          "-icount", "shift=0", "-semihosting-config", "enable=on,target=native",
                          "-kernel", str(elf)],
                         capture_output=True, text=True, timeout=QEMU_SECONDS)
    lines = (run.stdout + run.stderr).splitlines()  # QEMU writes semihosting output to stderr
    values, ticks = {"predict": [], "step": []}, []
    for line in lines:
        key, _, text = line.partition(" ")
        if key in values:
            values[key].append(np.frombuffer(bytes.fromhex(text), ">f4")[0])
        elif key == "step_ticks":
            ticks.append(int(text, 16))
    reference = Model(dequantized(spec) if weights == "int8" else spec)
    expected_predict = np.ravel(_main(reference.predict(x[None])))
    expected_step = np.zeros(0, np.float32)
    if result.report["can_stream"]:
        stream = reference.stream()
        expected_step = np.concatenate([np.ravel(stream.step(row)) for row in x])
    predict, step = np.float32(values["predict"]), np.float32(values["step"])
    agrees = (predict.shape == expected_predict.shape and step.shape == expected_step.shape
              and max_excess(predict, expected_predict) <= 0 and max_excess(step, expected_step) <= 0)
    return {"weights": weights, "exit": run.returncode, "self_check": "self_check pass" in lines,
            "agrees": bool(agrees), "predict": predict, "expected": expected_predict,
            "flash": sizes["text"] + sizes["data"], "state": result.report["state_bytes"],
            "work": 4 * work_floats, "step_stack": stack_bytes(directory, "step"),
            "check_stack": stack_bytes(directory, "self_check"), "stderr": run.stderr.strip()[-300:],
            "step_instructions": int(np.median(ticks)) * INSTRUCTIONS_PER_TICK if ticks else None}


def _bytes(count) -> str:
    return "-" if count is None else f"{count:,} B"


def _instructions(count) -> str:
    return "-" if count is None else f"{count:,} instr"


def _main(outputs):
    return outputs[0] if isinstance(outputs, list) else outputs


def _sizes(obj: Path) -> dict:
    listing = subprocess.run(["arm-none-eabi-size", "-A", str(obj)], capture_output=True, text=True,
                             check=True).stdout
    sizes = {"text": 0, "data": 0}
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            if parts[0].startswith((".text", ".rodata")):
                sizes["text"] += int(parts[1])
            elif parts[0].startswith((".data", ".bss")):
                sizes["data"] += int(parts[1])
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gru_engine.bench.embedded", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a bundle, .keras/.h5 or .onnx model (default: the airline model)")
    parser.add_argument("--out", help="keep the generated files and ELF images here")
    args = parser.parse_args(argv)
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"embedded-check: missing {', '.join(missing)}; install them with: {install_hint()}", file=sys.stderr)
        return 2
    spec, origin = airline_model(args.model)
    work_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gru-engine-embedded-"))
    results = []
    for weights in ("float32", "int8"):
        directory = work_root / weights
        directory.mkdir(parents=True, exist_ok=True)
        results.append(run_one(spec, weights, directory))
    print(f"embedded check: {origin} on a Cortex-M4F (QEMU mps2-an386), arm-none-eabi-gcc -Os, "
          f"input of {STEPS} steps")
    print(f"  {'weights':<8} {'flash':>9} {'state':>7} {'step stack':>11} {'predict work':>13} "
          f"{'step':>13} {'self-check':>11}  predict and step vs engine")
    failed = False
    for r in results:
        ok = r["exit"] == 0 and r["self_check"] and r["agrees"]
        failed |= not ok
        print(f"  {r['weights']:<8} {r['flash']:>7,} B {r['state']:>5,} B {_bytes(r['step_stack']):>11} "
              f"{r['work']:>11,} B {_instructions(r['step_instructions']):>13} "
              f"{'pass' if r['self_check'] else 'FAIL':>11}  "
              f"{'agree' if r['agrees'] else 'DIFFER'}" + ("" if ok else f"  (exit {r['exit']}: {r['stderr']})"))
    print(f"  flash: the model's code and constants; RAM: the state, plus the stack of NAME_step (streaming) or "
          f"NAME_predict's work buffer for {STEPS} steps; NAME_self_check needs {results[0]['check_stack']:,} B "
          "of stack; step: instructions QEMU executes per NAME_step (median of the "
          f"{STEPS}), a proxy for the core's cycles")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
