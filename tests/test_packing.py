"""Checkpoints hold a state's arrays packed, one array per dtype (checkpoint.packing): exact,
checked against the state they are restored into, and a checkpoint of one orbax array per
state array (written before packing) still reads."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import resnet_jax as rj
from resnet_jax.checkpoint import Checkpoints, packing


def tree():
    return {
        "w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
        "b": (jnp.ones(4, jnp.bfloat16), jnp.array(7, jnp.int32)),
        "key": jax.random.key(3),
        "empty": {},
    }


def test_pack_and_unpack_are_exact_with_and_without_a_template():
    t = tree()
    packed, layout = packing.pack(t)
    assert sorted(packed) == ["bfloat16", "float32", "int32", "uint32"]  # one array per dtype
    assert len(layout["arrays"]) == 4  # the empty dict holds no array
    assert sorted(r[2] for r in layout["arrays"]) == ["bfloat16", "float32", "int32", "uint32"]
    back = packing.unpack(packed, layout, t)
    assert jax.tree.structure(back) == jax.tree.structure(t)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(t)):
        if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
        else:
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    plain = packing.unpack(packed, layout)  # as saved: nested dicts, tuples as lists
    np.testing.assert_array_equal(plain["w"], np.asarray(t["w"]))
    assert isinstance(plain["b"], list) and int(plain["b"][1]) == 7


def test_a_layout_that_does_not_fit_the_state_is_refused():
    packed, layout = packing.pack(tree())
    other = {**tree(), "w": jnp.zeros((3, 2), jnp.float32)}
    with pytest.raises(ValueError, match="does not fit the state's"):
        packing.unpack(packed, layout, other)
    cut = {k: v[:-1] for k, v in packed.items()}
    with pytest.raises(ValueError, match="cut short"):
        packing.unpack(cut, layout, tree())


def test_a_checkpoint_of_one_array_per_state_array_still_reads(tmp_path):
    state = rj.create_train_state(rj.presets.tiny(), jax.random.key(0), (8, 8, 3), 4)
    folder = tmp_path / "checkpoints"
    manager = ocp.CheckpointManager(str(folder), item_names=("state", "meta"))
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({})))
    manager.wait_until_finished()
    manager.close()
    with Checkpoints(str(tmp_path), read_only=True) as ckpts:
        restored, meta, step = ckpts.restore(state, "latest")
    assert step == 1 and meta == {}
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    with Checkpoints(str(tmp_path), save_thread=False) as ckpts:  # and a packed one beside it
        ckpts.save(state.replace(step=state.step + 5), {"epoch": 1}, rank=1)
        again, _, step = ckpts.restore(state, "latest")
    assert step == 5 and {p.name for p in (folder / "5").iterdir()} >= {"layout", "meta", "state"}
    jax.tree.map(np.testing.assert_array_equal, again.params, state.params)
