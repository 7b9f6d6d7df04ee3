import polars as pl

from curate.data.schema import PAIR_SCHEMA, make_pair_id, meta_of, pairs_frame

PROMPT = [{"role": "user", "content": "What is 2+2?"}]


def test_pair_id_is_order_free_and_stable():
    a = make_pair_id(PROMPT, "4", "5")
    assert a == make_pair_id(PROMPT, "5", "4")
    assert len(a) == 16
    assert a != make_pair_id(PROMPT, "4", "6")
    assert a != make_pair_id([{"role": "user", "content": "What is 2+3?"}], "4", "5")
    assert a != make_pair_id([{"role": "system", "content": "What is 2+2?"}], "4", "5")


def test_pair_id_pinned_value():
    # the id must never change across runs, machines or versions: pinned literal
    assert make_pair_id(PROMPT, "5", "4") == "9fa7f4b16528be58"


def test_pairs_frame_schema_and_meta():
    df = pairs_frame([{"prompt": PROMPT, "chosen": "4", "rejected": "5", "meta": {"planted_flip": True}}])
    assert dict(df.schema) == PAIR_SCHEMA
    assert meta_of(df, "planted_flip") == [True]
    assert df["pair_id"][0] == make_pair_id(PROMPT, "4", "5")
    assert isinstance(df, pl.DataFrame)


def test_run_dir_files_get_normal_permissions(tmp_path):
    import os
    import stat

    from curate.rundir import atomic_write_bytes

    atomic_write_bytes(tmp_path / "x.txt", b"hi")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o666 & ~mask


def test_library_exports_resolve():
    import curate

    for name in curate.__all__:
        assert getattr(curate, name) is not None, name
