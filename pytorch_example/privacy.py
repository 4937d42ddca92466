"""Client-level DP's epsilon, as the app runs the mechanism (trust.py adds the noise).

The mechanism: each round, a uniform sample of exactly m of the connected SuperNodes
trains; each update is clipped to C = `dp-clipping-norm`; the mean over the m gets
Gaussian noise of standard deviation sigma x C / m (sigma = `dp-noise-multiplier`), so
sigma x C on the sum. A sampled client whose reply is missing or left out adds a zero
update. Neighbouring federations differ in one client's data (one replaced by another):
the sum moves by up to 2C, so each round is a Gaussian of sigma / 2 in units of that
sensitivity.

When the population is fixed and known, the sample also hides whether a client took
part, and the round is accounted as `SampledWithoutReplacementDpEvent(N, m, Gaussian)`
(Google's `dp_accounting`, RDP, `REPLACE_ONE`): "sampling credited". That holds in a
simulation, whose SuperNodes are those `options.num-supernodes` makes, and in a
deployment whose operator declares N with `dp-population`, in each round in which
exactly N SuperNodes were connected while the sample was drawn. Any other round (fewer
or more connected, a simulation resumed on another size) is the plain Gaussian, as
when nothing is declared: the sample is then uniform over a set that is not the one
accounted for. A reply left out keeps the credit: which clients are sampled does not
depend on anyone's data, and a missing update is a zero one, within the same 2C.

With `dp-clipping-quantile`, C itself follows that quantile of the updates' norms
(`Clipping`, Andrew et al. 2021): the count of updates within C is released too, with
noise of its own, and the updates' noise grows to match, so that a round is still the
Gaussian of sigma / 2 above and its epsilon the same as with C fixed.
"""

import math
from logging import INFO

import numpy as np
from dp_accounting import dp_event
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant
from flwr.common.logger import log
from flwr.serverapp import Grid

from pytorch_example.config import AppConfig, ConfigError

# Andrew et al.'s defaults, as Flower's adaptive wrappers take them: the norm's step
# size, and the noise on the count of updates within the norm, per sampled client.
CLIP_NORM_LR = 0.2
COUNT_NOISE_PER_CLIENT = 1 / 20


class Clipping:
    """DP's clipping norm C, and the noise multiplier of the updates' mean that goes with
    it: fixed at `dp-clipping-norm`, or with `dp-clipping-quantile` q adapted after each
    round, C x exp(-0.2 x (b - q)), where b is the share of the sampled clients' updates
    within C (a missing one, a zero update, is within), released with Gaussian noise of
    m / 20. The count's noise costs privacy, so the updates' multiplier rises from sigma
    to (sigma^-2 - (m / 10)^-2)^-1/2: together, one Gaussian of sigma / 2 (privacy.py's
    account, unchanged). `norm` is what the next round clips at; `used`, the last round's."""

    def __init__(self, config: AppConfig, sample_size: int, norm: float | None = None) -> None:
        self.quantile = config.dp_clipping_quantile
        self.sample_size = sample_size
        # A resumed run's adapted norm goes on; a fixed one is the run-config's.
        self.norm = norm if self.quantile and norm else config.dp_clipping_norm
        self.used: float | None = None
        self.within: int | None = None
        sigma = config.dp_noise_multiplier
        self.count_std = sample_size * COUNT_NOISE_PER_CLIENT if self.quantile else 0.0
        if self.quantile and sigma >= 2 * self.count_std:
            raise ConfigError(
                f"run-config key 'dp-clipping-quantile' = {self.quantile:g} needs dp-noise-multiplier "
                f"below {2 * self.count_std:g} with {sample_size} clients a round (the count its norm "
                "follows takes noise of its own, m / 20): sample more clients, lower the multiplier, or "
                "set dp-clipping-quantile=0"
            )
        self.noise_multiplier = (sigma**-2 - (2 * self.count_std) ** -2) ** -0.5 if self.quantile else sigma

    def clipped(self, within: int) -> None:
        """Note a round's aggregation at `norm`: `within` of its sampled clients' updates
        were within it."""
        self.used, self.within = self.norm, within

    def follow(self) -> None:
        """The next round's norm, once the round's model is released (the noisy count is
        released with it, and accounted with it): with a fixed norm, the same."""
        if self.quantile and self.within is not None:
            share = (self.within + np.random.normal(0.0, self.count_std)) / self.sample_size
            self.norm *= math.exp(-CLIP_NORM_LR * (share - self.quantile))
        self.within = None


def known_population(config: AppConfig, grid: Grid, started_with: int) -> int | None:
    """The fixed population a DP run's sampling is credited against, or None: in a
    simulation, the SuperNodes it made when the run started (`started_with`); in a
    deployment, `dp-population` if declared."""
    # The Simulation Engine's grid: its SuperNodes are made once, and never come or go.
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid  # noqa: PLC0415 (Flower's own)

    if not isinstance(grid, InMemoryGrid):
        return config.dp_population or None
    if config.dp_population and config.dp_population != started_with:
        raise ConfigError(
            f"run-config key 'dp-population' = {config.dp_population} but this simulation's run started "
            f"with {started_with} SuperNodes, which is its population: use dp-population=0"
        )
    return started_with


def run_ledger(config: AppConfig, grid: Grid, num_supernodes: int, outputs=None) -> "PrivacyLedger | None":
    """This run's epsilon account on `grid`, None without DP; `ConfigError` if no round is
    left to run, or its clipping cannot run with its noise. Without `outputs`, as a new
    run would start (the check before its folder is made); with them (`RunOutputs`), from
    what the run's folder spent, as it was accounted, said in the log."""
    if not config.dp_on:
        return None
    started_with, spent, norm = num_supernodes, (0, 0), None
    if outputs is not None:
        started_with, spent, norm = outputs.started_with, outputs.privacy_releases, outputs.clipping_norm
    population = known_population(config, grid, started_with)
    sample_size = config.train_sample_size(num_supernodes)
    ledger = PrivacyLedger(config, population, sample_size, *spent, Clipping(config, sample_size, norm))
    if outputs is not None:
        log(INFO, "DP's epsilon: %s", ledger.accounting())
    return ledger


class PrivacyLedger:
    """Epsilon at `dp-delta` after each released round, each accounted as it ran: the
    counts of credited and plain rounds are all it keeps, and epsilon is composed from
    them when asked (milliseconds, once a round).

    It starts `releases` DP rounds in, `credited` of them with their sampling credited (a
    resumed run goes on from what its folder spent), clipping as `clipping` says (by
    default, as a new run's); `ConfigError` if no round is left to run, or the clipping
    cannot run with this noise.
    """

    def __init__(
        self,
        config: AppConfig,
        population: int | None,
        sample_size: int,
        releases: int = 0,
        credited: int = 0,
        clipping: Clipping | None = None,
    ) -> None:
        self.config = config
        self.clipping = clipping or Clipping(config, sample_size)
        self.population = population
        self.sample_size = sample_size
        self.plain = dp_event.GaussianDpEvent(config.dp_noise_multiplier / 2)
        self.sampled = None
        if population is not None and sample_size < population:
            self.sampled = dp_event.SampledWithoutReplacementDpEvent(population, sample_size, self.plain)
        self.releases, self.credited = releases, credited
        # This round's: credited until a draw says otherwise (`draw`).
        self.round_credited = self.sampled is not None
        self.check_budget()

    def _epsilon(self, credited: int, plain: int) -> float:
        """Epsilon after `credited` sampled rounds and `plain` uncredited ones (a Python
        float: resume.pt takes no numpy scalar)."""
        if not credited + plain:
            return 0.0
        accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        for event, count in ((self.sampled, credited), (self.plain, plain)):
            if count:
                accountant.compose(event, count)
        return float(accountant.get_epsilon(self.config.dp_delta))

    def draw(self, connected_before: int, connected_after: int) -> None:
        """Note the SuperNodes connected just before and after this round's sample was
        drawn: it is credited only if both are the population."""
        self.round_credited = (
            self.sampled is not None and connected_before == connected_after == self.population
        )

    def next_round_would_exceed(self) -> bool:
        """Whether this round would take epsilon past `dp-max-epsilon` (if set)."""
        limit = self.config.dp_max_epsilon
        credited = self.credited + self.round_credited
        return bool(limit) and self._epsilon(credited, self.releases + 1 - credited) > limit

    def check_budget(self) -> None:
        """`ConfigError` if `dp-max-epsilon` leaves no round to run."""
        if self.next_round_would_exceed():
            spent = self.spent()["epsilon"]
            raise ConfigError(
                f"run-config key 'dp-max-epsilon' = {self.config.dp_max_epsilon:g} leaves no round to "
                f"run: epsilon is {spent:.3g} after {self.releases} round(s) and one more round would "
                "pass it (raise dp-max-epsilon or dp-noise-multiplier)"
            )

    def release(self) -> None:
        """Count a round whose noisy model left the aggregation, as its draw was; its
        clipping norm moves on."""
        self.releases += 1
        self.credited += self.round_credited
        self.clipping.follow()

    def spent(self) -> dict:
        """Epsilon so far at `dp-delta`, the releases it counts, how many of them had their
        sampling credited, and the clipping norm of the last."""
        epsilon = self._epsilon(self.credited, self.releases - self.credited)
        spent = {"epsilon": epsilon, "delta": self.config.dp_delta, "releases": self.releases,
                 "credited": self.credited}  # fmt: skip
        if self.clipping.used is not None:  # the norm the last round released clipped at
            spent["clipping_norm"] = self.clipping.used
        return spent

    def accounting(self) -> str:
        """How this run's epsilon is accounted, and why, in one clause."""
        if self.sampled is not None:
            return (
                f"sampling credited: a uniform {self.sample_size} of a fixed population of {self.population} "
                "SuperNodes, in each round that had exactly them connected"
            )
        if self.population is not None:
            return f"no sampling credit: every one of the {self.population} SuperNodes trains each round"
        return (
            "no sampling credit: the population is not known (set dp-population to the SuperNodes "
            "this deployment holds)"
        )
