"""A synthetic short-video world with known user preferences, reproducible by seed.

The world (all in a latent space of ``latent_dim`` dimensions, vectors unit-norm):

* **Topics**: ``num_topics`` random directions. **Authors** each have a topic and a personal offset.
* **Items**: an author (Zipf-popular), a tag (the author's topic, 10% of the time another), a latent vector near
  the tag's and author's directions, a quality ``q``, a duration (log-normal, seconds), a popularity prior, and a
  content embedding (a noisy random linear view of the latent vector, ``content_dim`` wide: what a multimodal
  encoder would give).
* **Users**: static attributes (gender, age bucket, region, activity), a bias ``b``, and 1..4 interests (directions
  near random topics, with weights) that **drift**: a random walk of step ``drift`` per session.
* **Logging policy**: each impression draws ``candidates`` items by popularity and shows one by a softmax over
  ``sharpness * <interest, v> + q`` for one interest drawn by weight (a recommender of moderate quality).
* **Engagement** of user u with item i at its current interest state: affinity
  ``a = sharpness * max_j <u_j, v_i> + q_i + b_u - 2``; ``watch_ratio = sigmoid(a + noise)``,
  ``playtime = watch_ratio * duration``; like / follow / forward / comment are Bernoulli with probabilities
  ``sigmoid(2a - 2)``, ``sigmoid(2a - 5)``, ``sigmoid(2a - 4.5)``, ``sigmoid(2a - 4.5)``.
* **History lengths**: log-normal around ``median_history`` (clipped to ``[min_history, max_history]``), plus a
  fraction ``heavy_user_frac`` of heavy users with ``heavy_history`` items (tens of thousands at most), grouped in
  sessions of about ``session_len`` items spread over ``span_days``.

Ground truth: :meth:`SyntheticWorld.true_reward` gives the expected watch ratio ``sigmoid(a)`` of (user, item) at the
users' final interest state ("now", after the log), the reward that post-training is scored against.

The default size (1000 users, 2000 items, ~100k interactions) builds in seconds and suits a 2-core CPU demo.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from onerec_fast.data.log import InteractionLog

__all__ = ["SyntheticConfig", "SyntheticWorld", "make_synthetic_world"]

_T0 = 1_700_000_000  # start of the log (seconds)
_CHUNK = 16384  # impressions scored at once


@dataclass
class SyntheticConfig:
    num_users: int = 1000
    num_items: int = 2000
    num_topics: int = 24
    num_authors: int = 300
    latent_dim: int = 16
    content_dim: int = 32
    max_interests: int = 4
    median_history: int = 50
    history_sigma: float = 0.8
    min_history: int = 20
    max_history: int = 2000
    heavy_user_frac: float = 0.003
    heavy_history: tuple[int, int] = (5000, 20000)
    session_len: float = 8.0
    span_days: float = 180.0
    drift: float = 0.15
    candidates: int = 50
    sharpness: float = 4.0
    seed: int = 0


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True).clip(1e-12)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class SyntheticWorld:
    """The generated world: ``log`` (an :class:`InteractionLog`) plus the hidden state behind it."""

    def __init__(self, config: SyntheticConfig):
        self.config = c = config
        rng = np.random.default_rng(c.seed)
        d = c.latent_dim
        # ---- items
        topics = _unit(rng.standard_normal((c.num_topics, d)))
        author_topic = rng.integers(0, c.num_topics, c.num_authors)
        author_dir = _unit(rng.standard_normal((c.num_authors, d)))
        author_pop = 1.0 / np.arange(1, c.num_authors + 1) ** 0.8
        author = rng.choice(c.num_authors, c.num_items, p=author_pop / author_pop.sum())
        tag = np.where(rng.random(c.num_items) < 0.9, author_topic[author], rng.integers(0, c.num_topics, c.num_items))
        noise = _unit(rng.standard_normal((c.num_items, d)))
        self.item_vec = _unit(topics[tag] + 0.4 * author_dir[author] + 0.35 * noise)
        self.item_quality = 0.5 * rng.standard_normal(c.num_items)
        duration = np.exp(rng.normal(np.log(30.0), 0.6, c.num_items))
        pop = np.exp(self.item_quality + rng.normal(0, 0.7, c.num_items))
        self.item_pop = pop / pop.sum()
        w = rng.standard_normal((d, c.content_dim)) / np.sqrt(d)
        content = self.item_vec @ w + 0.1 * rng.standard_normal((c.num_items, c.content_dim))

        # ---- users
        m = rng.integers(1, c.max_interests + 1, c.num_users)
        itopic = rng.integers(0, c.num_topics, (c.num_users, c.max_interests))
        u0 = _unit(topics[itopic] + 0.3 * _unit(rng.standard_normal((c.num_users, c.max_interests, d))))
        # Users with fewer interests repeat their first one (max over interests is unchanged).
        has = np.arange(c.max_interests)[None, :] < m[:, None]
        u0 = np.where(has[..., None], u0, u0[:, :1])
        weights = np.where(has, rng.dirichlet(np.ones(c.max_interests), c.num_users), 0.0)
        weights /= weights.sum(1, keepdims=True)
        self.user_bias = 0.5 * rng.standard_normal(c.num_users)
        n = np.clip(np.round(np.exp(rng.normal(np.log(c.median_history), c.history_sigma, c.num_users))),
                    c.min_history, c.max_history).astype(np.int64)
        heavy = rng.random(c.num_users) < c.heavy_user_frac
        n[heavy] = rng.integers(c.heavy_history[0], c.heavy_history[1] + 1, int(heavy.sum()))
        gender = rng.integers(1, 3, c.num_users)
        age = rng.integers(1, 8, c.num_users)
        region = rng.integers(1, 11, c.num_users)
        activity = np.digitize(n, [30, 60, 120, 500, 2000]) + 1  # 1..6

        # ---- sessions and interest drift (vectorized over all impressions)
        e = int(n.sum())
        user = np.repeat(np.arange(c.num_users), n)
        first = np.zeros(e, dtype=bool)
        first[np.cumsum(n) - n] = True
        new_sess = first | (rng.random(e) < 1.0 / c.session_len)
        sess = np.cumsum(new_sess) - 1  # global session id per impression
        g = int(sess[-1]) + 1
        sess_user = user[new_sess]
        steps = c.drift / np.sqrt(d) * rng.standard_normal((g, c.max_interests, d))
        cs = np.cumsum(steps, 0)
        user_first_sess = np.searchsorted(sess_user, np.arange(c.num_users))
        walk = cs - cs[user_first_sess[sess_user]]  # zero at each user's first session
        state = _unit(u0[sess_user] + walk)  # [G, max_interests, d]
        last_sess = np.searchsorted(sess_user, np.arange(c.num_users), side="right") - 1
        self.user_interests = state[last_sess]  # [U, max_interests, d] at "now"

        # ---- logging policy: one impression per row
        item = np.empty(e, dtype=np.int64)
        aff = np.empty(e)
        cum_w = np.cumsum(weights, 1)
        for s in range(0, e, _CHUNK):
            sl = slice(s, min(e, s + _CHUNK))
            st = state[sess[sl]]  # [b, K, d]
            active = (rng.random(st.shape[0])[:, None] > cum_w[user[sl]]).sum(1).clip(max=c.max_interests - 1)
            cand = rng.choice(c.num_items, (st.shape[0], c.candidates), p=self.item_pop)
            ua = st[np.arange(st.shape[0]), active]  # [b, d]
            score = c.sharpness * np.einsum("bd,bcd->bc", ua, self.item_vec[cand]) + self.item_quality[cand]
            pick = np.argmax(score + rng.gumbel(size=score.shape), 1)
            item[sl] = cand[np.arange(len(pick)), pick]
            aff[sl] = self._affinity(st, user[sl], item[sl])
        watch = _sigmoid(aff + 0.5 * rng.standard_normal(e))
        playtime = watch * duration[item]
        labels = {k: (rng.random(e) < _sigmoid(2 * aff - off)).astype(np.int64)
                  for k, off in (("like", 2.0), ("follow", 5.0), ("forward", 4.5), ("comment", 4.5))}

        # ---- timestamps: sessions spread over span_days, impressions inside a session back to back
        sessions_per_user = np.bincount(sess_user, minlength=c.num_users)
        gap_mean = c.span_days * 86400.0 / sessions_per_user
        gaps = np.where(new_sess, rng.exponential(gap_mean[user]), playtime + 2.0)
        gaps[first] = rng.uniform(0, 7 * 86400.0, c.num_users)
        csum = np.cumsum(gaps)
        ts = _T0 + csum - np.repeat(csum[first] - gaps[first], n)

        self.log = InteractionLog(
            user=user, item=item, timestamp=np.round(ts).astype(np.int64), num_users=c.num_users,
            num_items=c.num_items,
            engagement={"watch_ratio": watch.astype(np.float32), "playtime": playtime.astype(np.float32), **labels},
            item_features={"author": author.astype(np.int64), "tag": tag.astype(np.int64),
                           "duration": duration.astype(np.float32), "content": content.astype(np.float32)},
            user_features={"gender": gender, "age": age, "region": region, "activity": activity.astype(np.int64)},
            positive_rule="like>0|follow>0|forward>0|comment>0|watch_ratio>=0.9",
            name=f"synthetic(seed={c.seed})",
        ).sort_()

    def _affinity(self, interests: np.ndarray, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``interests: [n, K, d]`` (each row's user state), ``users``/``items``: ``[n]`` -> affinity ``[n]``."""
        dots = np.einsum("nkd,nd->nk", interests, self.item_vec[items]).max(1)
        return self.config.sharpness * dots + self.item_quality[items] + self.user_bias[users] - 2.0

    def true_reward(self, users, items) -> np.ndarray:
        """Expected watch ratio (in (0, 1)) of each (user, item) pair at the users' final interest state.

        ``users``, ``items``: int arrays of one shape (broadcastable) -> float64 array of that shape.
        """
        u, i = np.broadcast_arrays(np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64))
        flat_u, flat_i = u.reshape(-1), i.reshape(-1)
        return _sigmoid(self._affinity(self.user_interests[flat_u], flat_u, flat_i)).reshape(u.shape)

    def true_reward_matrix(self, users) -> np.ndarray:
        """``[len(users), num_items]``: :meth:`true_reward` of every item for each user."""
        users = np.asarray(users, dtype=np.int64)
        dots = np.einsum("ukd,id->uik", self.user_interests[users], self.item_vec).max(2)
        a = self.config.sharpness * dots + self.item_quality[None, :] + self.user_bias[users, None] - 2.0
        return _sigmoid(a)

    def describe(self) -> dict:
        return {"config": asdict(self.config), "interactions": len(self.log)}


def make_synthetic_world(config: SyntheticConfig | None = None, **overrides) -> SyntheticWorld:
    """Build the world: ``make_synthetic_world(num_users=200, seed=3)``; same config and seed -> same world."""
    cfg = config or SyntheticConfig()
    if overrides:
        unknown = set(overrides) - set(asdict(cfg))
        if unknown:
            raise TypeError(f"unknown SyntheticConfig fields: {sorted(unknown)}")
        cfg = SyntheticConfig(**{**asdict(cfg), **overrides})
    return SyntheticWorld(cfg)
