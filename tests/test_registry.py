import sys
import types
from importlib.metadata import EntryPoint, entry_points

from mlx_lm_dspark import registry
from mlx_lm_dspark.loader import load_drafter
from mlx_lm_dspark_tools.tiny import build_pair


def test_kinds_come_from_entry_points():
    names = [k.name for k in registry.drafter_kinds()]
    assert {"dspark", "dflash"} <= set(names)
    assert {"dspark", "dflash"} <= {ep.name for ep in entry_points(group=registry.GROUP)}


def test_third_party_kind_can_claim_a_checkpoint(monkeypatch, tmp_path):
    import mlx_lm_dspark.kinds as ours

    claimed = []
    third = ours.DrafterKind("eagle-test", lambda c: c.get("block_size") == 7,
                             lambda c: claimed.append(c) or ours._build(c))
    module = types.ModuleType("third_party_kind")
    module.KIND = third
    monkeypatch.setitem(sys.modules, "third_party_kind", module)
    original = registry.entry_points

    def fake_entry_points(group):
        return list(original(group=group)) + [EntryPoint("eagle-test", "third_party_kind:KIND", group)]

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    registry.drafter_kinds.cache_clear()
    try:
        drafter = load_drafter(build_pair(tmp_path)[1], bits=None)
        assert drafter.kind == "eagle-test" and claimed
    finally:
        registry.drafter_kinds.cache_clear()
