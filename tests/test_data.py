"""Data pipeline: loaders (ML-100K, ML-1M, tables, sequences), malformed inputs, the synthetic world, and the
jagged per-user batches against a padded reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from onerec_fast.data import (
    BatchConfig,
    DataFormatError,
    InteractionLog,
    UserSequenceDataset,
    collate_user_batch,
    load_interactions_table,
    load_ml1m,
    load_movielens,
    load_sequences,
    make_dataloader,
    make_synthetic_world,
    parse_rule,
)
from onerec_fast.data.sources import load_source

ML100K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ml-100k"
needs_ml100k = pytest.mark.skipif(not (ML100K / "u.data").exists(), reason=f"ML-100K not found at {ML100K}")


# ----------------------------------------------------------------------------------------- MovieLens
@needs_ml100k
def test_ml100k_counts_and_features():
    log = load_movielens(ML100K)
    assert (log.num_users, log.num_items, len(log)) == (943, 1682, 100000)
    assert log.name == "ml-100k" and log.positive_rule == "rating>=4"
    assert log.item_raw_ids[0] == 1 and log.item_titles[0].startswith("Toy Story")
    assert log.item_features["genres"].shape == (1682, 19) and log.engagement["rating"].min() == 1
    off = log.user_offsets()
    assert off[-1] == 100000 and np.diff(off).min() >= 20  # every ML-100K user rated at least 20 movies
    for u in (0, 500, 942):  # chronological within each user
        assert np.all(np.diff(log.timestamp[off[u]:off[u + 1]]) >= 0)
    assert set(log.cardinalities()) >= {"genre", "gender", "age", "occupation", "zip", "rating"}


def _write_ml100k(folder: Path, data: str, item: str | None = None, user: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text(data)
    genres = "|".join(["0"] * 18)
    (folder / "u.item").write_text(item if item is not None else
                                   f"1|Toy Story (1995)|01-Jan-1995||http://x|1|{genres}\n"
                                   f"2|GoldenEye (1995)|01-Jan-1995||http://x|0|{genres}\n")
    (folder / "u.user").write_text(user if user is not None else "1|24|M|technician|85711\n2|53|F|other|94043\n")
    return folder


def test_small_ml100k_and_ml1m_files(tmp_path):
    log = load_movielens(_write_ml100k(tmp_path / "a", "1\t1\t5\t10\n2\t2\t3\t5\n1\t2\t4\t7\n"))
    assert (log.num_users, log.num_items, len(log)) == (2, 2, 3)
    assert log.item.tolist() == [1, 0, 1] and log.timestamp.tolist() == [7, 10, 5]  # sorted by user, then time
    d = tmp_path / "m1"
    d.mkdir()
    (d / "ratings.dat").write_text("1::10::5::100\n1::20::2::50\n")
    (d / "movies.dat").write_text("10::Heat (1995)::Action|Crime\n20::Up (2009)::Animation\n")
    (d / "users.dat").write_text("1::F::25::4::12345\n")
    log = load_ml1m(d)
    assert log.item.tolist() == [1, 0] and log.item_features["year"].tolist() == [1995.0, 2009.0]
    assert log.item_features["genre"].tolist() == [1, 3] and log.user_features["age"].tolist() == [3]


@pytest.mark.parametrize("data,item,user,where", [
    ("1\t1\t5\t10\n1\t2\tfive\t11\n", None, None, ("u.data:2", "'rating'", "'five'")),
    ("1\t1\t5\t10\n1\t2\t9\t11\n", None, None, ("u.data:2", "'rating'", "1..5")),
    ("1\t1\t5\n", None, None, ("u.data:1", "'timestamp'", "4")),
    ("1\t1\t5\t10\n2\t7\t4\t3\n", None, None, ("u.data:2", "'item_id'", "not listed")),
    ("1\t1\t5\t10\n", "1|Toy Story|x||u|1|" + "|".join(["0"] * 17) + "|2\n", None,
     ("u.item:1", "'genre:Western'", "0 or 1")),
    ("1\t1\t5\t10\n", None, "1|24|X|technician|85711\n", ("u.user:1", "'gender'", "F or M")),
    ("1\t1\t5\t10\n", None, "1|old|M|technician|85711\n", ("u.user:1", "'age'", "integer")),
])
def test_malformed_movielens_names_file_line_field(tmp_path, data, item, user, where):
    folder = _write_ml100k(tmp_path / "ml", data, item, user)
    with pytest.raises(DataFormatError) as e:
        load_movielens(folder)
    for part in where:
        assert part in str(e.value)


# ----------------------------------------------------------------------------------------- tables / sequences
def test_interactions_table_with_features(tmp_path):
    (tmp_path / "log.csv").write_text("user,item,timestamp,like,watch\n"
                                      "a,10,100,1,3.5\na,11,50,0,1.0\nb,10,70,1,2\n")
    (tmp_path / "items.csv").write_text("item,author,duration\n10,x,12.5\n12,y,\n11,x,3.0\n")
    (tmp_path / "users.csv").write_text("user,country\nb,fr\nc,de\n")
    log = load_interactions_table(tmp_path / "log.csv", item_features=tmp_path / "items.csv",
                                  user_features=tmp_path / "users.csv", positive_rule="like>0")
    assert (log.num_users, log.num_items, len(log)) == (3, 3, 3)  # user c and item 12 come from the feature tables
    assert log.item_raw_ids.tolist() == [10, 11, 12] and log.user_raw_ids.tolist() == ["a", "b", "c"]
    assert log.engagement["like"].dtype == np.int64 and log.engagement["watch"].dtype == np.float32
    assert log.item.tolist() == [1, 0, 0] and log.timestamp.tolist() == [50, 100, 70]
    assert log.item_features["author"].tolist() == [1, 1, 2]
    np.testing.assert_allclose(log.item_features["duration"], [12.5, 3.0, 7.75])  # missing -> column mean
    assert log.user_features["country"].tolist() == [0, 2, 1]  # 0 = unknown


@pytest.mark.parametrize("text,kw,where", [
    ("user,item,timestamp,like\nu,1,5,1\nu,2,6,yes\n", {}, ("log.csv:3", "'like'", "'yes'")),
    ("user,item,timestamp\nu,1,5\nu,2\n", {}, ("log.csv:3", "'timestamp'", "3 comma-separated")),
    ("user,item,when\nu,1,5\n", {}, ("log.csv:1", "'timestamp'", "missing", "'unixReviewTime'")),
    ("user_id,userId,item,timestamp\nu,v,1,5\n", {}, ("log.csv:1", "'user'", "['user_id', 'userId']")),
    ("user,item,timestamp\nu,1,5\n", {"item_col": "asin"}, ("log.csv:1", "'asin'", "missing")),
    ("user,item,timestamp\nu,1,noon\n", {}, ("log.csv:2", "'timestamp'", "'noon'")),
    ("", {}, ("log.csv:1", "header")),
])
def test_malformed_table(tmp_path, text, kw, where):
    (tmp_path / "log.csv").write_text(text)
    with pytest.raises(DataFormatError) as e:
        load_interactions_table(tmp_path / "log.csv", **kw)
    for part in where:
        assert part in str(e.value)


def test_table_columns_found_by_their_common_names(tmp_path):
    """MovieLens' CSV releases, Amazon reviews and Yelp name their columns otherwise; a caller's names win."""
    (tmp_path / "ml.csv").write_text("userId,movieId,rating,timestamp\n7,3,4.5,20\n7,1,2.0,10\n9,3,5.0,30\n")
    log = load_interactions_table(tmp_path / "ml.csv")
    assert (log.num_users, log.num_items, len(log)) == (2, 2, 3) and list(log.engagement) == ["rating"]
    assert log.item.tolist() == [0, 1, 1] and log.timestamp.tolist() == [10, 20, 30]
    (tmp_path / "az.csv").write_text("reviewerID,asin,overall,unixReviewTime\nA1,B9,5,1400000000\n")
    assert load_interactions_table(tmp_path / "az.csv").item_raw_ids.tolist() == ["B9"]
    (tmp_path / "two.csv").write_text("user,item,iid,timestamp\nu,1,8,5\nu,2,9,6\n")
    log = load_interactions_table(tmp_path / "two.csv", item_col="iid", engagement_cols=[])
    assert log.item_raw_ids.tolist() == [8, 9] and not log.engagement


def test_movielens_csv_release(tmp_path):
    """A ML-20M-style folder (``ratings.csv`` + ``movies.csv``), or its ratings file, loads as MovieLens (the positive
    rule ``rating>=4``); a ``ratings.csv`` elsewhere is a generic table (every interaction positive)."""
    folder = tmp_path / "ml-20m"
    folder.mkdir()
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n1,29,4.0,1112484676\n"
                                        "2,2,4.5,1112484580\n")
    (folder / "movies.csv").write_text('movieId,title,genres\n2,Jumanji (1995),Adventure|Children\n'
                                       '29,"City of Lost Children, The (1995)",Fantasy\n')
    for spec in (folder, folder / "ratings.csv"):
        log, _ = load_source(str(spec))
        assert (log.name, log.positive_rule, len(log), log.num_items) == ("ml-20m", "rating>=4", 3, 2)
        np.testing.assert_allclose(log.engagement["rating"], [4.0, 3.5, 4.5])
    (folder / "movies.csv").unlink()
    log, _ = load_source(str(folder / "ratings.csv"))
    assert (log.name, log.positive_rule) == ("ratings", "")
    (folder / "ratings.csv").unlink()
    with pytest.raises(FileNotFoundError, match="no MovieLens ratings found"):
        load_source(str(folder))


def test_parquet_needs_pyarrow_or_loads(tmp_path):
    p = tmp_path / "log.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        p.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            load_interactions_table(p)
        return
    pq.write_table(pa.table({"user": [1, 1], "item": [5, 6], "timestamp": [2, 1]}), p)
    assert load_interactions_table(p).item.tolist() == [1, 0]


def test_sequences(tmp_path):
    (tmp_path / "seq.txt").write_text("1 5 6 7\n2 5 9\n\n1 8\n")
    log = load_sequences(tmp_path / "seq.txt")
    assert log.user.tolist() == [0, 0, 0, 0, 1, 1] and log.item_raw_ids[log.item].tolist() == [5, 6, 7, 8, 5, 9]
    assert log.timestamp.tolist() == [0, 86400, 172800, 259200, 0, 86400]
    (tmp_path / "bad.txt").write_text("1 5 6\n2 x\n")
    with pytest.raises(DataFormatError, match=r"bad.txt:2: field 'item 1'"):
        load_sequences(tmp_path / "bad.txt")
    (tmp_path / "short.txt").write_text("1 5\n3\n")
    with pytest.raises(DataFormatError, match=r"short.txt:2: field 'item'"):
        load_sequences(tmp_path / "short.txt")


def test_load_source(tmp_path):
    (tmp_path / "s.txt").write_text("1 2 3\n")
    assert load_source(str(tmp_path / "s.txt"))[0].num_items == 2
    log, world = load_source("synthetic", synthetic_overrides={"num_users": 30, "num_items": 50})
    assert world is not None and log.num_users == 30
    with pytest.raises(FileNotFoundError):
        load_source(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------- synthetic world
def test_synthetic_world_reproducible_and_scored():
    kw = dict(num_users=80, num_items=300, heavy_user_frac=0.05, heavy_history=(1000, 1500))
    a, b = make_synthetic_world(seed=1, **kw), make_synthetic_world(seed=1, **kw)
    c = make_synthetic_world(seed=2, **kw)
    for k in ("user", "item", "timestamp"):
        assert np.array_equal(getattr(a.log, k), getattr(b.log, k))
    assert all(np.array_equal(a.log.engagement[k], b.log.engagement[k]) for k in a.log.engagement)
    assert not np.array_equal(a.log.item[:500], c.log.item[:500])
    lens = np.diff(a.log.user_offsets())
    assert lens.min() >= 20 and lens.max() >= 1000  # tens to (scaled-down) thousands
    assert set(a.log.engagement) == {"watch_ratio", "playtime", "like", "follow", "forward", "comment"}
    assert a.log.item_features["content"].shape == (300, 32)
    r = a.true_reward(a.log.user, a.log.item)
    assert r.shape == (len(a.log),) and np.all((r > 0) & (r < 1))
    rand = a.true_reward(a.log.user, np.random.default_rng(0).integers(0, 300, len(a.log)))
    assert r.mean() > rand.mean() + 0.05  # the logging policy is better than random
    m = a.true_reward_matrix([0, 5])
    np.testing.assert_allclose(m[1, [3, 7]], a.true_reward([5, 5], [3, 7]))
    with pytest.raises(TypeError, match="unknown"):
        make_synthetic_world(num_userz=3)


# ----------------------------------------------------------------------------------------- batches
def test_parse_rule():
    cols = {"like": np.array([0, 1, 0, 0]), "w": np.array([0.9, 0.1, 0.5, 0.95])}
    assert parse_rule("like>0|w>=0.9")(cols).tolist() == [True, True, False, True]
    assert parse_rule("like==0&w>0.4")(cols).tolist() == [True, False, True, True]
    assert parse_rule("")(cols).all()
    with pytest.raises(ValueError, match="cannot parse"):
        parse_rule("like >> 0")
    with pytest.raises(ValueError, match="no column"):
        parse_rule("lke>0")(cols)


def tiny_world():
    return make_synthetic_world(num_users=40, num_items=120, min_history=3, median_history=12,
                                heavy_user_frac=0.05, heavy_history=(300, 400), seed=4)


def padded_reference(log: InteractionLog, codes, user, pos, short_len, positive_len, positive):
    """Straightforward per-user lists of the short and positive pathways, padded with -1."""
    off = log.user_offsets()
    rows = np.arange(off[user], off[user] + pos)
    short = log.item[rows[-short_len:]] if short_len else log.item[rows[:0]]
    pos_rows = rows[positive[rows]][-positive_len:]
    return short, log.item[pos_rows]


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_batch_matches_padded_reference(split):
    w = tiny_world()
    log = w.log
    codes = np.random.default_rng(0).integers(0, 16, (log.num_items, 4))
    cfg = BatchConfig(short_len=5, positive_len=7, lifelong_len=10_000)
    ds = UserSequenceDataset(log, codes, split, config=cfg)
    idx = np.random.default_rng(1).choice(len(ds), 25, replace=False)
    batch = collate_user_batch([ds[i] for i in idx])
    positive = parse_rule(log.positive_rule)(log.engagement)
    ref_short, ref_pos, ref_life = [], [], []
    for i in idx:
        u, p = int(ds.sample_user[i]), int(ds.sample_pos[i])
        s, q = padded_reference(log, codes, u, p, 5, 7, positive)
        ref_short.append(s)
        ref_pos.append(q)
        ref_life.append(log.item[log.user_offsets()[u]:log.user_offsets()[u] + p])
    for jag, ref in ((batch.short, ref_short), (batch.positive, ref_pos), (batch.lifelong, ref_life)):
        assert jag.offsets.dtype == torch.int32 and jag.offsets.shape == (26,)
        assert jag.max_len == max(len(r) for r in ref)
        pad, mask = jag.padded(jag.item, pad=-1)
        want = torch.full((25, jag.max_len), -1, dtype=torch.int64)
        for b, r in enumerate(ref):
            want[b, :len(r)] = torch.from_numpy(r)
        assert torch.equal(pad, want) and torch.equal(mask, want >= 0)
        assert torch.equal(jag.codes, torch.from_numpy(codes)[jag.item])
        assert jag.sparse["author"].shape == jag.item.shape and jag.dense["timestamp"].dtype == torch.float32
        assert bool((jag.dense["timestamp"] >= 0).all())
        assert jag.codes.shape == (int(jag.offsets[-1]), 4)
    assert torch.equal(batch.target_codes, torch.from_numpy(codes)[batch.target_item])
    assert set(batch.user_feats) == {"gender", "age", "region", "activity"}
    assert set(batch.target_sparse) == {"like", "follow", "forward", "comment"}
    assert bool((batch.lifelong.dense["cluster_size"] == 1).all())


def test_leave_one_out_without_leakage():
    log = tiny_world().log
    codes = np.zeros((log.num_items, 3), dtype=np.int64)
    lens = np.diff(log.user_offsets())
    sets = {s: UserSequenceDataset(log, codes, s) for s in ("train", "valid", "test")}
    full = lens >= 3
    for s, want in (("test", lens - 1), ("valid", lens - 2)):
        assert np.array_equal(sets[s].sample_user, np.flatnonzero(full))
        assert np.array_equal(sets[s].sample_pos, want[full])
    tr = sets["train"]
    last_train = np.where(full, lens - 3, lens - 1)
    assert np.all(tr.sample_pos <= last_train[tr.sample_user]) and np.all(tr.sample_pos >= 1)
    assert len(tr) == int(np.maximum(last_train, 0).sum())
    # A train sample's pathways only contain rows before its target (so never the valid/test rows).
    for i in range(0, len(tr), 97):
        s = tr[i]
        u, p = int(tr.sample_user[i]), int(tr.sample_pos[i])
        hist = set(log.item[log.user_offsets()[u]:log.user_offsets()[u] + p].tolist())
        for path in ("short", "positive", "lifelong"):
            assert set(s[path]["item"].tolist()) <= hist
    one = UserSequenceDataset(log, codes, "train", config=BatchConfig(train_targets="last"))
    assert len(one) == int((last_train >= 1).sum())  # a target needs min_history=1 item before it
    capped = UserSequenceDataset(log, codes, "train", config=BatchConfig(max_targets_per_user=2))
    assert len(capped) == int(np.minimum(np.maximum(last_train, 0), 2).sum())
    engaged = UserSequenceDataset(log, codes, "train", config=BatchConfig(target_rule="like>0"))
    assert np.all(log.engagement["like"][log.user_offsets()[engaged.sample_user] + engaged.sample_pos] == 1)


def test_lifelong_compression_in_batches():
    w = tiny_world()
    log = w.log
    codes = np.zeros((log.num_items, 3), dtype=np.int64)
    emb = torch.from_numpy(log.item_features["content"])
    with pytest.raises(ValueError, match="item_emb"):
        UserSequenceDataset(log, codes, "test", config=BatchConfig(lifelong_len=16))
    cfg = BatchConfig(lifelong_len=16, lifelong_stride=4)
    ds = UserSequenceDataset(log, codes, "test", item_emb=emb, config=cfg)
    assert ds.precompute_lifelong() > 0
    batch = collate_user_batch([ds[i] for i in range(len(ds))])
    life = batch.lifelong
    lens = life.lengths()
    assert int(lens.max()) <= 16
    sizes = torch.split(life.dense["cluster_size"], lens.tolist())
    for b, sz in enumerate(sizes):
        p = int(ds.sample_pos[b])
        covered = p if p <= 16 else p // 4 * 4  # compressed up to the last multiple of the stride
        assert int(sz.sum()) == covered
    assert bool((life.dense["timestamp"] >= 0).all())
    again = UserSequenceDataset(log, codes, "test", item_emb=emb, config=cfg)  # on-demand path, same result
    assert torch.equal(collate_user_batch([again[i] for i in range(len(again))]).lifelong.item, life.item)


def test_dataloader_workers_and_device_moves():
    log = tiny_world().log
    codes = np.arange(log.num_items * 3).reshape(-1, 3) % 7
    ds = UserSequenceDataset(log, codes, "train", config=BatchConfig(max_targets_per_user=3))
    ref = list(make_dataloader(ds, batch_size=16))
    got = list(make_dataloader(ds, batch_size=16, num_workers=2))
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert torch.equal(a.short.item, b.short.item) and torch.equal(a.target_codes, b.target_codes)
    moved = ref[0].to("cpu")
    assert len(moved) == 16 and torch.equal(moved.positive.offsets, ref[0].positive.offsets)
    shuffled = [b.user for b in make_dataloader(ds, batch_size=16, shuffle=True, seed=3)]
    again = [b.user for b in make_dataloader(ds, batch_size=16, shuffle=True, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(shuffled, again))


def test_dataset_rejects_bad_codes():
    log = tiny_world().log
    with pytest.raises(ValueError, match="item_codes"):
        UserSequenceDataset(log, np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="split"):
        UserSequenceDataset(log, np.zeros((log.num_items, 3), dtype=np.int64), "dev")


# ----------------------------------------------------------------------------------------- every row validated
# (issue 17, finding 4: the audit's silent misparses and raw exceptions)
def _ratings_lines(n=12):
    return [f"{1 + k % 2}\t{1 + k // 2 % 2}\t{1 + k % 5}\t{100 + k}" for k in range(n)]


def test_ratings_with_compensating_field_counts_name_the_line(tmp_path):
    """Line 10 with a 5th field and line 11 with only 3 have the right token total: the fast path used to load
    them as one invented and one lost interaction."""
    lines = _ratings_lines()
    lines[9] += "\t7"
    lines[10] = lines[10].rsplit("\t", 1)[0]
    folder = _write_ml100k(tmp_path / "ml", "\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=r"u\.data:10: field 'timestamp': expected 4 '\\t'-separated fields, "
                                              r"got 5"):
        load_movielens(folder)


@pytest.mark.parametrize("data,where", [
    ("1\t1\t5\t10\n1\t2\t4\t123456789012345678901234\n", r"u\.data:2: field 'timestamp': integer 1234.* 64 bits"),
    ("12345678901234567890123\t1\t5\t10\n", r"u\.data:1: field 'user_id': integer 1234.* 64 bits"),
    ("1\t1\t5\t10\n1\t\t4\t11\n", r"u\.data:2: field 'item_id': expected an integer, got ''"),
    ("1\t1\t5\t10\n1\t2\t4\tnan\n", r"u\.data:2: field 'timestamp': expected an integer, got 'nan'"),
    ("", r"u\.data: field 'user_id': empty file"),
    ("\n\n", r"u\.data: field 'user_id': empty file"),
])
def test_bad_ratings_rows_name_file_line_field(tmp_path, data, where):
    with pytest.raises(DataFormatError, match=where):
        load_movielens(_write_ml100k(tmp_path / "ml", data))


def test_clean_ratings_take_the_fast_path_and_match_the_careful_parser(tmp_path):
    from onerec_fast.data._parse import fast_int_table, read_rows, to_int

    path = tmp_path / "u.data"
    path.write_text("\n".join(_ratings_lines()) + "\n-3\t4\t5\t6")  # a negative id, no final newline
    table = fast_int_table(path, "\t", 4)
    careful = [[to_int(path, ln, "x", v) for v in f] for ln, f in read_rows(path, "\t", ("a", "b", "c", "d"))]
    assert table is not None and table.tolist() == careful


def test_invalid_utf8_names_file_line_and_field(tmp_path):
    folder = _write_ml100k(tmp_path / "ml", "1\t1\t5\t10\n")
    (folder / "u.data").write_bytes(b"1\t1\t5\t10\n1\t2\t4\t1\xff1\n")
    with pytest.raises(DataFormatError, match=r"u\.data:2: field 'timestamp': not valid utf-8 \(byte 0xff"):
        load_movielens(folder)
    (tmp_path / "log.csv").write_bytes(b"user,item,timestamp\nu,1,5\nu\xe9,2,6\n")
    with pytest.raises(DataFormatError, match=r"log\.csv:3: field 'user': not valid utf-8"):
        load_interactions_table(tmp_path / "log.csv")
    (tmp_path / "seq.txt").write_bytes(b"1 5 6\n2 7 \xc3\n")
    with pytest.raises(DataFormatError, match=r"seq\.txt:2: field 'field 3': not valid utf-8"):
        load_sequences(tmp_path / "seq.txt")


@pytest.mark.parametrize("text,where", [
    ("user,item,timestamp\nu,1,5\nu,2,nan\n", r"log\.csv:3: field 'timestamp': expected a finite number"),
    ("user,item,timestamp\nu,1,inf\n", r"log\.csv:2: field 'timestamp': expected a finite number"),
    ("user,item,timestamp\nu,1,1e300\n", r"log\.csv:2: field 'timestamp': timestamp 1e300 does not fit"),
    ("user,item,timestamp,watch\nu,1,5,2.5\nu,2,6,NaN\n", r"log\.csv:3: field 'watch': expected a finite number"),
    ("user,item,timestamp\nu,1,5\n,2,6\n", r"log\.csv:3: field 'user': empty id"),
    ("user,item,timestamp\nu,,5\n", r"log\.csv:2: field 'item': empty id"),
    ("user,item,timestamp\n12345678901234567890123,1,5\n", r"log\.csv:2: field 'user': integer 1234.* 64 bits"),
    ("user,item,timestamp\nu,1,123456789012345678901234\n", r"log\.csv:2: field 'timestamp': integer .* 64 bits"),
    ("user,item,timestamp\n", r"log\.csv: field 'user': no interactions"),
])
def test_bad_table_rows_name_file_line_field(tmp_path, text, where):
    (tmp_path / "log.csv").write_text(text)
    with pytest.raises(DataFormatError, match=where):
        load_interactions_table(tmp_path / "log.csv")


def test_feature_table_with_an_empty_key_names_the_line(tmp_path):
    (tmp_path / "log.csv").write_text("user,item,timestamp\nu,1,5\n")
    (tmp_path / "items.csv").write_text("item,author\n1,x\n,y\n")
    with pytest.raises(DataFormatError, match=r"items\.csv:3: field 'item': empty id"):
        load_interactions_table(tmp_path / "log.csv", item_features=tmp_path / "items.csv")


def test_empty_and_oversized_sequence_files(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataFormatError, match=r"empty\.txt: field 'line': empty file"):
        load_sequences(tmp_path / "empty.txt")
    (tmp_path / "big.txt").write_text("1 5\n2 12345678901234567890123\n")
    with pytest.raises(DataFormatError, match=r"big\.txt:2: field 'item 1': integer .* 64 bits"):
        load_sequences(tmp_path / "big.txt")


def test_a_ratings_table_is_not_read_as_sequences(tmp_path):
    """u.data (``user item rating timestamp``) parsed as sequences invents items from ratings and times (issue
    18): the file itself loads as its MovieLens folder, and any such table given as sequences is refused."""
    from onerec_fast.data.log import DataFormatError
    from onerec_fast.data.sources import load_source

    table = "1\t5\t3\t881250949\n1\t7\t4\t891717742\n2\t9\t2\t878887116\n"
    (tmp_path / "ratings.txt").write_text(table)
    with pytest.raises(DataFormatError, match="user/item/rating/timestamp table"):
        load_source(str(tmp_path / "ratings.txt"))
    (tmp_path / "seq.txt").write_text("1 5 3 881250949\n2 9 2\n")  # ragged: sequences
    assert load_source(str(tmp_path / "seq.txt"))[0].num_items == 5
    if (ML100K / "u.data").exists():
        assert load_source(str(ML100K / "u.data"))[0].num_items == 1682
