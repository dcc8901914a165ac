"""parallel/collectives on hand-written HLO: which computations run how often, and what an
async collective moves. Expectations from the ring formulas in the module docstring."""

import pytest

from llmcxr_jax.parallel import collectives as coll

ADD = """
%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}
"""


def _by_name(hlo: str) -> dict[str, coll.Collective]:
    return {c.name: c for c in coll.collectives(hlo, n_devices=4)}


def test_a_called_computations_collectives_are_counted():
    hlo = "HloModule m\n" + ADD + """
%inner (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %ar = f32[8]{0} all-reduce(%p), replica_groups={{0,1,2,3}}, to_apply=%add
}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  ROOT %c = f32[8]{0} call(%x), to_apply=%inner
}
"""
    (ar,) = _by_name(hlo).values()
    assert (ar.name, ar.kind, ar.group_size, ar.executions) == ("ar", "all-reduce", 4, 1)
    assert ar.bytes_sent == pytest.approx(2 * 8 * 4 * 3 / 4)  # f32[8], ring all-reduce over 4


def test_both_branches_of_a_two_way_conditional_are_counted():
    hlo = "HloModule m\n" + ADD + """
%on_true (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %ar = f32[8]{0} all-reduce(%p), replica_groups={{0,1,2,3}}, to_apply=%add
}

%on_false (q: f32[2]) -> f32[8] {
  %q = f32[2]{0} parameter(0)
  ROOT %ag = f32[8]{0} all-gather(%q), replica_groups={{0,1,2,3}}, dimensions={0}
}

ENTRY %main (x: f32[8], y: f32[2], c: pred[]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  %y = f32[2]{0} parameter(1)
  %c = pred[] parameter(2)
  ROOT %r = f32[8]{0} conditional(%c, %x, %y), true_computation=%on_true, \
false_computation=%on_false
}
"""
    found = _by_name(hlo)
    assert sorted(found) == ["ag", "ar"]
    assert found["ag"].kind == "all-gather" and found["ag"].executions == 1
    assert found["ag"].bytes_sent == pytest.approx(8 * 4 * 3 / 4)  # the result's bytes


def test_async_starts_count_their_results_not_their_context_scalars():
    hlo = """HloModule m

ENTRY %main (x: f32[16], y: f32[4]) -> (f32[16], f32[16]) {
  %x = f32[16]{0} parameter(0)
  %y = f32[4]{0} parameter(1)
  %cp = (f32[16]{0}, f32[16]{0}, u32[], u32[]) collective-permute-start(%x), \
source_target_pairs={{0,1},{1,0}}
  %cpd = f32[16]{0} collective-permute-done(%cp)
  %ag = (f32[4]{0}, f32[16]{0}) all-gather-start(%y), replica_groups={{0,1,2,3}}, dimensions={0}
  %agd = f32[16]{0} all-gather-done(%ag)
  ROOT %t = (f32[16]{0}, f32[16]{0}) tuple(%cpd, %agd)
}
"""
    found = _by_name(hlo)
    assert found["cp"].kind == "collective-permute"
    assert found["cp"].element_bytes == (16 * 4,)  # f32[16] sent whole, not a u32[] context
    assert found["ag"].element_bytes == (16 * 4,)  # the gathered f32[16], not the f32[4] operand
