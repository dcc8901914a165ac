"""The collectives of a compiled XLA program, read from its HLO text: kind, count, bytes sent.

A step compiled for simulated CPU devices (`compiled.as_text()`) already holds every collective
XLA's SPMD partitioner inserted; nothing has to run. Each collective is counted as often as it
executes (a while loop's body, e.g. a scan over layers, runs `known_trip_count` times) and its
bytes sent per device follow the usual ring algorithms over its group of n devices:

    all-gather      result bytes  * (n - 1) / n
    reduce-scatter  operand bytes * (n - 1) / n
    all-reduce      2 * bytes     * (n - 1) / n     (a reduce-scatter, then an all-gather)
    all-to-all      operand bytes * (n - 1) / n
    collective-permute  operand bytes

XLA:CPU compiles what TPU and GPU run with two differences this module undoes, so the counts are
those of the program an accelerator would run:

- It has no reduce-scatter: the partitioner's all-reduce + dynamic-slice stays as it is (TPU and
  GPU fuse the pair into a reduce-scatter). An all-reduce whose result every user slices down to
  1/n is counted as the reduce-scatter it becomes there.
- It runs bf16 collectives in f32 (a convert to f32 before, back to bf16 after). A collective
  whose operand was just converted from bf16, or whose every user converts its result back to
  bf16, is counted at 2 bytes per element.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Iterable

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*(.+?)\s+([a-z][a-z0-9-]*)\((.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_CALLED = re.compile(
    r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([^\s,)}]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_PASS_THROUGH = ("bitcast", "reshape", "copy", "transpose", "get-tuple-element")


@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.dims)


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    shape: list[Array]  # one entry per tuple element (one for an array)
    operands: list[str]
    args: str  # the text between the brackets, e.g. a parameter's number
    attrs: str
    root: bool


@dataclasses.dataclass
class Computation:
    name: str
    instructions: dict[str, Instruction]

    @property
    def root(self) -> Instruction:
        return next(i for i in self.instructions.values() if i.root)


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of the program, as an accelerator runs it."""

    name: str
    kind: str  # one of KINDS, after the CPU rewrites above are undone
    group_size: int
    element_bytes: tuple[int, ...]  # logical bytes of each (tuple) element moved
    executions: int  # times it runs per program execution

    @property
    def bytes_sent(self) -> float:
        """Bytes one device sends per execution (ring algorithms, module docstring)."""
        n = self.group_size
        if n <= 1:
            return 0.0
        total = sum(self.element_bytes)
        if self.kind == "collective-permute":
            return float(total)
        factor = 2.0 if self.kind == "all-reduce" else 1.0
        return factor * total * (n - 1) / n


def _arrays(shape_text: str) -> list[Array]:
    return [Array(dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _ARRAY.findall(shape_text) if dtype in _DTYPE_BYTES]


def _split_operands(rest: str) -> tuple[str, str]:
    """The text inside `op(...)` (up to its closing bracket) and the attributes after it."""
    depth = 1
    for i, ch in enumerate(rest):
        if ch in "({":
            depth += 1
        elif ch in ")}":
            depth -= 1
            if depth == 0:
                return rest[:i], rest[i + 1:]
    return rest, ""


def parse_hlo(text: str) -> tuple[dict[str, Computation], str]:
    """Computations of an HLO module's text, and the name of its entry computation."""
    comps: dict[str, Computation] = {}
    entry = ""
    current: Computation | None = None
    for line in text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header and not line.startswith(" "):
                current = Computation(header.group(2), {})
                comps[current.name] = current
                if header.group(1):
                    entry = current.name
            continue
        if line.startswith("}"):
            current = None
            continue
        match = _INSTR.match(line)
        if match:
            root, name, shape, opcode, rest = match.groups()
            args, attrs = _split_operands(rest)
            operands = re.findall(r"%([^\s,)]+)", args)
            current.instructions[name] = Instruction(name, opcode, _arrays(shape), operands,
                                                     args, attrs, bool(root))
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _executions(comps: dict[str, Computation], entry: str) -> dict[str, int]:
    """How often each computation runs per execution of the entry computation."""
    counts: dict[str, int] = collections.defaultdict(int)

    def visit(name: str, times: int) -> None:
        counts[name] += times
        for instr in comps[name].instructions.values():
            if instr.opcode == "fusion":
                continue  # fused computations hold no collectives
            trip = 1
            if instr.opcode == "while":
                found = _TRIP.search(instr.attrs)
                trip = int(found.group(1)) if found else 1
            # `to_apply` is a call's body, but a reduction's combiner (an add) elsewhere. A
            # conditional's branches are all counted as run once each: an over-count, as only
            # one runs (which one is decided at run time).
            called = [(kind, callee) for kind, callee in _CALLED.findall(instr.attrs)
                      if kind != "to_apply" or instr.opcode == "call"]
            branches = _BRANCHES.search(instr.attrs)
            if branches:
                called += [("branch", b.strip().lstrip("%")) for b in branches.group(1).split(",")]
            for kind, callee in called:
                if callee in comps:
                    visit(callee, times * (trip if kind in ("body", "condition") else 1))

    visit(entry, 1)
    return counts


def _group_size(attrs: str, n_devices: int) -> int:
    """Devices per replica group, from any of XLA's three printed forms."""
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\S+)?(?: \{([^}]*)\})?",
                     attrs)
    if mesh:
        sizes = dict((k.strip("'"), int(v)) for k, v in
                     (part.split("=") for part in mesh.group(1).split(",")))
        axes = [a.strip().strip("'") for a in mesh.group(2).split(",")] if mesh.group(2) else sizes
        return math.prod(sizes[a] for a in axes)
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if iota:
        return int(iota.group(2))
    explicit = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if explicit:
        return len(explicit.group(1).split(","))
    pairs = re.search(r"source_target_pairs=\{(.*?)\}\}?", attrs)
    if pairs:
        return 2
    return n_devices  # empty replica groups: every device


class _Uses:
    """Users of every instruction of one computation, and fused computations by name."""

    def __init__(self, comps: dict[str, Computation], comp: Computation):
        self.comps, self.comp = comps, comp
        self.users: dict[str, list[Instruction]] = collections.defaultdict(list)
        for instr in comp.instructions.values():
            for op in instr.operands:
                self.users[op].append(instr)

    def fused(self, instr: Instruction) -> Computation | None:
        if instr.opcode != "fusion":
            return None
        found = re.search(r"calls=%?([^\s,)}]+)", instr.attrs)
        return self.comps.get(found.group(1)) if found else None


def _fused_params(fused: Computation) -> dict[int, Instruction]:
    """Parameter number -> parameter instruction of a fused computation."""
    return {int(instr.args): instr for instr in fused.instructions.values()
            if instr.opcode == "parameter"}


def _consumers_in(fused: Computation, start: Instruction) -> list[Instruction]:
    """What `start` feeds inside `fused`, looking through shape-only ops."""
    users = collections.defaultdict(list)
    for instr in fused.instructions.values():
        for op in instr.operands:
            users[op].append(instr)
    out, frontier = [], [start]
    while frontier:
        node = frontier.pop()
        for user in users[node.name]:
            if user.opcode in _PASS_THROUGH:
                frontier.append(user)
            else:
                out.append(user)
    return out


def _terminal_users(uses: _Uses, name: str) -> list[tuple[Instruction, Computation | None,
                                                            Instruction | None]]:
    """Users of `name` past get-tuple-element/bitcast/copy, each with, for a fusion, its fused
    computation and the parameter `name` arrives as."""
    out, frontier = [], [name]
    while frontier:
        node = frontier.pop()
        for user in uses.users[node]:
            if user.opcode in _PASS_THROUGH:
                frontier.append(user.name)
                continue
            fused = uses.fused(user)
            param = _fused_params(fused).get(user.operands.index(node)) if fused else None
            out.append((user, fused, param))
    return out


def _slices_to(user: Instruction, fused: Computation | None, param: Instruction | None,
               elements: int, n: int, uses: _Uses, depth: int = 0) -> bool:
    """Whether this user keeps only 1/n of the `elements` it receives (a dynamic-slice,
    possibly after converts, possibly inside a fusion or behind a convert fusion)."""
    if n <= 1:
        return False
    if fused is None:
        if user.opcode == "dynamic-slice":
            return user.shape[0].elements * n == elements
        if user.opcode == "convert" and depth < 3:
            return all(_slices_to(u, f, p, elements, n, uses, depth + 1)
                       for u, f, p in _terminal_users(uses, user.name))
        return False
    frontier = [param]
    while frontier:
        node = frontier.pop()
        consumers = _consumers_in(fused, node)
        if not consumers:
            if fused.root.name == node.name and depth < 3:  # a convert-only fusion: look past it
                return all(_slices_to(u, f, p, elements, n, uses, depth + 1)
                           for u, f, p in _terminal_users(uses, user.name))
            return False
        for consumer in consumers:
            if consumer.opcode == "dynamic-slice":
                if consumer.shape[0].elements * n != elements:
                    return False
            elif consumer.opcode == "convert":
                frontier.append(consumer)
            else:
                return False
    return True


def _converts_to_bf16(user: Instruction, fused: Computation | None,
                      param: Instruction | None) -> bool:
    if fused is None:
        return user.opcode == "convert" and user.shape[0].dtype == "bf16"
    consumers = _consumers_in(fused, param)
    return bool(consumers) and all(c.opcode == "convert" and c.shape[0].dtype == "bf16"
                                   for c in consumers)


def _from_bf16(uses: _Uses, name: str) -> bool:
    """Whether `name` is an f32 value just converted from bf16 (XLA:CPU's upcast)."""
    instr = uses.comp.instructions.get(name)
    while instr is not None and instr.opcode in _PASS_THROUGH and instr.operands:
        instr = uses.comp.instructions.get(instr.operands[0])
    if instr is None:
        return False
    fused = uses.fused(instr)
    node, comp = (fused.root, fused) if fused else (instr, uses.comp)
    while node.opcode in _PASS_THROUGH and node.operands:
        node = comp.instructions[node.operands[0]]
    if node.opcode != "convert" or not node.operands:
        return False
    source = comp.instructions.get(node.operands[0])
    return source is not None and bool(source.shape) and source.shape[0].dtype == "bf16"


def _element_outputs(uses: _Uses, instr: Instruction) -> list[str]:
    """The value name of each tuple element of `instr` (its get-tuple-elements) or itself."""
    if len(instr.shape) == 1:
        return [instr.name]
    names = [""] * len(instr.shape)
    for user in uses.users[instr.name]:
        if user.opcode == "get-tuple-element":
            index = int(re.search(r"index=(\d+)", user.attrs).group(1))
            names[index] = user.name
    return names


def _start_results(instr: Instruction) -> list[Array]:
    """The results of an async `*-start` op. All-gather- and collective-permute-start return
    (operands, results[, u32[] context scalars]); all-reduce-start returns its results alone."""
    n = len(instr.operands)
    return instr.shape[n:2 * n] if len(instr.shape) >= 2 * n else instr.shape[:n]


def collectives(hlo_text: str, n_devices: int) -> list[Collective]:
    """Every collective of a compiled program (`compiled.as_text()`), as an accelerator runs it
    (see the module docstring)."""
    comps, entry = parse_hlo(hlo_text)
    runs = _executions(comps, entry)
    found: list[Collective] = []
    for comp_name, times in runs.items():
        comp = comps[comp_name]
        uses = _Uses(comps, comp)
        for instr in comp.instructions.values():
            kind = instr.opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            n = _group_size(instr.attrs, n_devices)
            shape = _start_results(instr) if instr.opcode.endswith("-start") else instr.shape
            outputs = _element_outputs(uses, instr) if not instr.opcode.endswith("-start") \
                else [""] * len(shape)
            moved, scattered = [], []
            for i, array in enumerate(shape):
                operand = instr.operands[i] if i < len(instr.operands) else ""
                sinks = _terminal_users(uses, outputs[i]) if outputs[i] else []
                bf16 = array.dtype == "f32" and (
                    _from_bf16(uses, operand) or
                    (bool(sinks) and all(_converts_to_bf16(*s) for s in sinks)))
                itemsize = 2 if bf16 else _DTYPE_BYTES[array.dtype]
                # An all-gather moves its result's bytes, a reduce-scatter its operand's.
                elements = array.elements * (n if kind == "reduce-scatter" else 1)
                moved.append(elements * itemsize)
                scattered.append(kind == "all-reduce" and bool(sinks) and all(
                    _slices_to(*s, array.elements, n, uses) for s in sinks))
            if kind == "all-reduce" and any(scattered):
                rs = tuple(b for b, s in zip(moved, scattered) if s)
                ar = tuple(b for b, s in zip(moved, scattered) if not s)
                found.append(Collective(instr.name, "reduce-scatter", n, rs, times))
                if ar:
                    found.append(Collective(instr.name, "all-reduce", n, ar, times))
            else:
                found.append(Collective(instr.name, kind, n, tuple(moved), times))
    return found


@dataclasses.dataclass(frozen=True)
class Summary:
    """Per-step totals by kind: collectives executed and bytes one device sends."""

    counts: dict[str, int]
    bytes_sent: dict[str, float]

    @property
    def total_count(self) -> int:
        return sum(self.counts.values())

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes_sent.values())


def summarize(found: Iterable[Collective]) -> Summary:
    counts = {k: 0 for k in KINDS}
    sent = {k: 0.0 for k in KINDS}
    for c in found:
        counts[c.kind] += c.executions
        sent[c.kind] += c.executions * c.bytes_sent
    return Summary(counts, sent)
