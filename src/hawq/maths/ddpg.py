"""A small DDPG agent that chooses, layer by layer, the ratio of channels at each bit width.

This is the search of HAQ / channel-wise HAWQ as a generic tool: an episode walks the layers in
order; at layer ``l`` the agent sees a state (the layer's static features, normalised to [0, 1]
per column, plus optional dynamic features such as the budget used so far and its previous
action) and proposes an action in [0, 1]^(B-1). The action is read as *sorted cut points*
``0 <= c_1 <= ... <= c_{B-1} <= 1`` of the unit interval, so ratios = diff([0, c, 1]) lie on the
simplex (ratio of channels at each of the B bit widths, ascending). After the last layer the
ratios (L, B) go through ``make_plan`` (which may enforce a budget by construction) and
``reward(plan)`` scores the plan; every transition of the episode is stored with that reward
minus a moving-average baseline (divided by the spread of the warm-up rewards), as in HAQ.

Pieces: :class:`Actor` and :class:`Critic` MLPs, :class:`ReplayBuffer`, exploration noise from a
truncated normal on [0, 1] whose width decays per episode (:func:`truncated_normal`), target
networks updated softly (``tau``). Reproducible: networks are initialised from ``seed`` inside
``torch.random.fork_rng`` (the global RNG is untouched), noise and minibatches come from a
``numpy.random.Generator``. ``time_budget`` stops early (then the result depends on speed).

Distributed (:mod:`hawq.base.dist`): every rank runs the same agent from the same seed, so all
ranks draw the same random numbers; the reward must return the same number on every rank (e.g.
:class:`hawq.analysis.channelwise.ChannelRewardModel`, which splits its held-out data over the
ranks and all-reduces its sums), and then every rank follows the same trajectory.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from scipy.special import ndtr, ndtri
from tqdm.auto import tqdm

from hawq.base import dist
from hawq.base.errors import ConfigError, NumericalError

__all__ = ["Actor", "Critic", "DDPGAgent", "DDPGConfig", "DDPGResult", "ReplayBuffer",
           "cuts_to_ratios", "ddpg_search", "normalise_features", "truncated_normal"]


@dataclass
class DDPGConfig:
    """Options of :func:`ddpg_search` (defaults follow HAQ, scaled down for CPU).

    ``episodes`` in all (the first ``warmup`` act uniformly at random, the last one is the
    noise-free policy); ``noise`` is the initial standard deviation of the truncated-normal
    exploration, multiplied by ``noise_decay`` after each learning episode; ``updates`` gradient
    steps per learning episode (default: one per layer); ``time_budget`` seconds stops early.
    """

    episodes: int = 100
    warmup: int = 20
    hidden: tuple[int, ...] = (128, 128)
    actor_lr: float = 1e-3
    critic_lr: float = 2e-3
    tau: float = 0.01
    gamma: float = 1.0
    batch_size: int = 64
    buffer_size: int = 4000
    noise: float = 0.5
    noise_decay: float = 0.97
    updates: int | None = None
    baseline_decay: float = 1.0
    time_budget: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.episodes, int) or self.episodes < 1:
            raise ConfigError(f"episodes={self.episodes!r}: give an integer >= 1")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"warmup={self.warmup!r}: give an integer >= 0")
        for name in ("tau", "baseline_decay"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: give a value in (0, 1]")
        if not 0.0 <= self.gamma <= 1.0:
            raise ConfigError(f"gamma={self.gamma!r}: give a discount in [0, 1]")
        if self.noise < 0 or not 0.0 < self.noise_decay <= 1.0:
            raise ConfigError("noise must be >= 0 and noise_decay in (0, 1]")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ConfigError(f"time_budget={self.time_budget!r}: give seconds > 0 or None")
        if self.batch_size < 1 or self.buffer_size < self.batch_size:
            raise ConfigError("batch_size must be >= 1 and buffer_size >= batch_size")


@dataclass
class DDPGResult:
    """Best plan found: its reward, ratios (L, B), the reward of every episode, timing."""

    best_plan: Any
    best_reward: float
    best_ratios: np.ndarray
    best_episode: int
    rewards: list[float] = field(default_factory=list)
    episodes: int = 0
    seconds: float = 0.0
    stopped_by_time: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the plan itself is left out)."""
        return {"best_reward": self.best_reward, "best_ratios": self.best_ratios.tolist(),
                "best_episode": self.best_episode, "rewards": list(self.rewards),
                "episodes": self.episodes, "seconds": self.seconds,
                "stopped_by_time": self.stopped_by_time}


def truncated_normal(rng: np.random.Generator, mean: np.ndarray, sigma: float,
                     lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """One draw per entry of N(mean, sigma^2) truncated to [lo, hi], by inverse CDF (exact,
    vectorised, one uniform per entry). ``sigma=0`` returns ``clip(mean)``."""
    mean = np.clip(np.asarray(mean, dtype=float), lo, hi)
    if sigma <= 0:
        return mean
    a, b = ndtr((lo - mean) / sigma), ndtr((hi - mean) / sigma)
    u = a + rng.random(mean.shape) * (b - a)
    x = mean + sigma * ndtri(np.clip(u, 1e-12, 1 - 1e-12))
    return np.clip(x, lo, hi)


def cuts_to_ratios(action: np.ndarray) -> np.ndarray:
    """Ratios on the simplex from cut points in [0, 1]^(B-1) (sorted first): (..., B)."""
    cuts = np.sort(np.clip(np.asarray(action, dtype=float), 0.0, 1.0), axis=-1)
    zeros = np.zeros(cuts.shape[:-1] + (1,))
    return np.diff(np.concatenate([zeros, cuts, zeros + 1.0], axis=-1), axis=-1)


def normalise_features(features: np.ndarray) -> np.ndarray:
    """Min-max normalise each column of an (L, F) array to [0, 1] (constant columns -> 0)."""
    f = np.asarray(features, dtype=float)
    if f.ndim != 2 or not np.all(np.isfinite(f)):
        raise ConfigError("features: give a finite (layers, features) array")
    lo, hi = f.min(axis=0), f.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (f - lo) / span


def _mlp(sizes: Sequence[int], out_act: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    if out_act is not None:
        layers.append(out_act)
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """mu(s): state (F,) -> sorted cut points in [0, 1]^A: the cumulative sums of a softmax
    over A+1 logits (so the action is a point of the simplex written as cut points)."""

    def __init__(self, state_dim: int, action_dim: int, hidden: Sequence[int] = (128, 128)):
        super().__init__()
        self.net = _mlp([state_dim, *hidden, action_dim + 1], None)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(s), dim=-1).cumsum(-1)[..., :-1].clamp(0.0, 1.0)


class Critic(nn.Module):
    """Q(s, a): concatenated state and action -> scalar."""

    def __init__(self, state_dim: int, action_dim: int, hidden: Sequence[int] = (128, 128)):
        super().__init__()
        self.net = _mlp([state_dim + action_dim, *hidden, 1], None)

    def forward(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([s, a], dim=-1)).squeeze(-1)


class ReplayBuffer:
    """Ring buffer of (s, a, r, s', done) in preallocated float32 arrays; uniform sampling."""

    def __init__(self, capacity: int, state_dim: int, action_dim: int):
        self.capacity = capacity
        self.s = np.zeros((capacity, state_dim), np.float32)
        self.a = np.zeros((capacity, action_dim), np.float32)
        self.r = np.zeros(capacity, np.float32)
        self.s2 = np.zeros((capacity, state_dim), np.float32)
        self.done = np.zeros(capacity, np.float32)
        self.size = 0
        self.pos = 0

    def add(self, s: np.ndarray, a: np.ndarray, r: float, s2: np.ndarray, done: bool) -> None:
        i = self.pos
        self.s[i], self.a[i], self.r[i], self.s2[i], self.done[i] = s, a, r, s2, float(done)
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, ...]:
        """``n`` transitions drawn uniformly with replacement, as float tensors."""
        idx = rng.integers(0, self.size, size=n)
        return tuple(torch.from_numpy(arr[idx]) for arr in (self.s, self.a, self.r, self.s2,
                                                             self.done))


class DDPGAgent:
    """Actor, critic, their target copies, optimisers; :meth:`act` and :meth:`update`."""

    def __init__(self, state_dim: int, action_dim: int, config: DDPGConfig):
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.actor = Actor(state_dim, action_dim, config.hidden)
            self.critic = Critic(state_dim, action_dim, config.hidden)
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=config.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr)

    @torch.no_grad()
    def act(self, state: np.ndarray) -> np.ndarray:
        """The deterministic policy mu(state) as a numpy array in [0, 1]^A."""
        return self.actor(torch.as_tensor(state, dtype=torch.float32)[None])[0].numpy()

    def update(self, batch: tuple[torch.Tensor, ...]) -> tuple[float, float]:
        """One critic and one actor gradient step, then soft target updates. Returns losses."""
        s, a, r, s2, done = batch
        with torch.no_grad():
            q_next = self.critic_target(s2, self.actor_target(s2))
            target = r + self.config.gamma * (1.0 - done) * q_next
        critic_loss = (self.critic(s, a) - target).pow(2).mean()
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        actor_loss = -self.critic(s, self.actor(s)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        tau = self.config.tau
        with torch.no_grad():
            for net, tgt in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for p, pt in zip(net.parameters(), tgt.parameters()):
                    pt.mul_(1.0 - tau).add_(p, alpha=tau)
        return float(critic_loss.detach()), float(actor_loss.detach())


def ddpg_search(features: np.ndarray, n_bits: int, reward: Callable[[Any], float],
                make_plan: Callable[[np.ndarray], Any] | None = None,
                dynamic: Callable[[int, np.ndarray], Sequence[float]] | None = None,
                config: DDPGConfig | None = None, progress: bool = False) -> DDPGResult:
    """Search per-layer bit-width ratios with DDPG; returns the best plan seen.

    ``features``: (L, F) static layer features (normalised here, per column, to [0, 1]).
    ``n_bits``: B >= 2 bit widths; the action at each layer has B-1 cut points.
    ``make_plan(ratios)``: ratios (L, B) -> the plan that ``reward`` scores (default: the ratios
    themselves); enforce budgets here. ``dynamic(l, ratios_so_far)``: extra state features of
    layer l given the ratios (l, B) chosen for the layers before it (e.g. budget used so far).
    The previous layer's action is always appended to the state.
    Cost: ``episodes`` calls of ``make_plan`` and ``reward`` plus ``updates`` (default L)
    minibatch gradient steps per learning episode on two small MLPs.

    Distributed (:mod:`hawq.base.dist`): every rank runs the whole search (the agent is tiny)
    with the same seed; ``reward`` must give every rank the same value (it may talk to the
    other ranks: it runs inside one :func:`hawq.base.dist.guard`, so a rank that fails stops
    the others with :class:`hawq.base.dist.RankFailedError` naming it). With ``time_budget``
    the ranks agree to stop when any of them ran out of time (one small all-reduce per
    episode), so they stop together and keep the same result.
    """
    with dist.guard():
        return _ddpg_search(features, n_bits, reward, make_plan, dynamic, config, progress)


def _ddpg_search(features: np.ndarray, n_bits: int, reward: Callable[[Any], float],
                 make_plan: Callable[[np.ndarray], Any] | None,
                 dynamic: Callable[[int, np.ndarray], Sequence[float]] | None,
                 config: DDPGConfig | None, progress: bool) -> DDPGResult:
    config = config or DDPGConfig()
    feats = normalise_features(features)
    L = feats.shape[0]
    if not isinstance(n_bits, int) or n_bits < 2:
        raise ConfigError(f"n_bits={n_bits!r}: give at least 2 bit widths to choose ratios from")
    adim = n_bits - 1
    make_plan = make_plan or (lambda r: r)
    n_dyn = len(dynamic(0, np.zeros((0, n_bits)))) if dynamic is not None else 0
    sdim = feats.shape[1] + n_dyn + adim
    agent = DDPGAgent(sdim, adim, config)
    buf = ReplayBuffer(config.buffer_size, sdim, adim)
    rng = np.random.default_rng(config.seed)
    updates = max(16, L) if config.updates is None else config.updates

    def state(l: int, ratios: np.ndarray, prev: np.ndarray) -> np.ndarray:
        dyn = [] if dynamic is None else list(dynamic(l, ratios[:l]))
        return np.concatenate([feats[l], np.asarray(dyn, dtype=float), prev]).astype(np.float32)

    best: DDPGResult | None = None
    rewards: list[float] = []
    baseline, scale = 0.0, 1.0
    sigma = config.noise
    t0 = time.perf_counter()
    stopped = False
    bar = tqdm(range(config.episodes), desc="ddpg", disable=not progress or not dist.is_main(),
               leave=False)
    for ep in bar:
        last = ep == config.episodes - 1
        random_ep = ep < config.warmup and not last
        ratios = np.zeros((L, n_bits))
        prev = np.zeros(adim)
        states, actions = [], []
        for l in range(L):
            s = state(l, ratios, prev)
            if random_ep:
                a = rng.random(adim)
            else:
                a = truncated_normal(rng, agent.act(s), 0.0 if last else sigma)
            a = np.sort(a)  # canonical cut points: the stored action is what was played
            ratios[l] = cuts_to_ratios(a)
            states.append(s)
            actions.append(a)
            prev = a
        plan = make_plan(ratios)
        r = float(reward(plan))
        if not np.isfinite(r):
            raise NumericalError(f"reward is {r} in episode {ep}: the reward must be finite")
        rewards.append(r)
        if best is None or r > best.best_reward:
            best = DDPGResult(plan, r, ratios.copy(), ep)
        if ep + 1 == max(config.warmup, 1):
            baseline = float(np.mean(rewards))
            scale = float(np.std(rewards)) or max(abs(baseline), 1.0)
        else:
            baseline = config.baseline_decay * baseline + (1 - config.baseline_decay) * r
        norm_r = (r - baseline) / scale
        for l in range(L):
            s2 = states[l + 1] if l + 1 < L else states[l]
            buf.add(states[l], actions[l], norm_r, s2, l == L - 1)
        if ep + 1 >= config.warmup and buf.size >= config.batch_size and not last:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny MLPs: threads only add overhead
            try:
                for _ in range(updates):
                    agent.update(buf.sample(rng, config.batch_size))
            finally:
                torch.set_num_threads(threads)
            if ep + 1 > config.warmup:
                sigma *= config.noise_decay
        bar.set_postfix(best=f"{best.best_reward:.4g}", last=f"{r:.4g}")
        if config.time_budget is not None and _out_of_time(t0, config.time_budget):
            stopped = not last
            break
    bar.close()
    assert best is not None
    best.rewards = rewards
    best.episodes = len(rewards)
    best.seconds = time.perf_counter() - t0
    best.stopped_by_time = stopped
    return best


def _out_of_time(t0: float, budget: float) -> bool:
    """Whether ``budget`` seconds since ``t0`` are spent, on any rank (so all ranks agree)."""
    over = time.perf_counter() - t0 > budget
    if not dist.is_distributed():
        return over
    return bool(dist.all_reduce_sum(torch.tensor([float(over)])).item() > 0)
