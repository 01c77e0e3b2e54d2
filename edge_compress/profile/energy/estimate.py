"""Energy estimated from operation counts where no sensor exists. An order-of-magnitude figure, never a measurement.

The per-operation energies are Horowitz's 45 nm figures (M. Horowitz,
"Computing's energy problem (and what we can do about it)", ISSCC 2014,
pp. 10-14, doi:10.1109/ISSCC.2014.6757323). They are the energy of the
arithmetic and the memory access alone: a real processor spends several times
more on instruction fetch, control and data movement inside the core (the same
paper puts a 32-bit add's overhead in a CPU at tens of pJ), and newer nodes
are cheaper per operation. Use the estimate to compare models with each other
on one assumption, never as a device's energy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from edge_compress.errors import ConfigError
from edge_compress.profile.energy.reading import EnergyReading

MAC_DTYPES = ("int8", "fp16", "fp32")
MEMORIES = ("dram", "sram")
# The estimate's stated band: the true energy is taken to be within a factor of
# ESTIMATE_SPREAD above the figure (overheads the table leaves out), so
# error_j = (ESTIMATE_SPREAD - 1) * joules.
ESTIMATE_SPREAD = 10.0


@dataclass(frozen=True)
class OpEnergyTable:
    """Energy per operation in picojoules, with the source it was taken from."""

    int8_add_pj: float
    int32_add_pj: float
    int8_mult_pj: float
    int32_mult_pj: float
    fp16_add_pj: float
    fp16_mult_pj: float
    fp32_add_pj: float
    fp32_mult_pj: float
    sram_read_32b_pj: float
    dram_read_32b_pj: float
    source: str
    node_nm: int

    def __post_init__(self) -> None:
        bad = {k: v for k, v in vars(self).items() if k.endswith("_pj") and not v >= 0}
        if bad:
            raise ConfigError(f"OpEnergyTable {bad}: energies must be non-negative picojoules")

    def mac_pj(self, dtype: str) -> float:
        """One multiply-accumulate: int8 multiplies accumulate into int32 (as gemmlowp/TFLite do); floats stay in their type."""
        costs = {
            "int8": self.int8_mult_pj + self.int32_add_pj,
            "fp16": self.fp16_mult_pj + self.fp16_add_pj,
            "fp32": self.fp32_mult_pj + self.fp32_add_pj,
        }
        if dtype not in costs:
            raise ConfigError(f"MAC dtype {dtype!r}; choices: {', '.join(MAC_DTYPES)}")
        return costs[dtype]

    def byte_pj(self, memory: str) -> float:
        """Moving one byte: a quarter of a 32-bit read from ``memory``."""
        if memory not in MEMORIES:
            raise ConfigError(f"memory {memory!r}; choices: {', '.join(MEMORIES)}")
        return (self.dram_read_32b_pj if memory == "dram" else self.sram_read_32b_pj) / 4.0


HOROWITZ_45NM = OpEnergyTable(
    int8_add_pj=0.03,
    int32_add_pj=0.1,
    int8_mult_pj=0.2,
    int32_mult_pj=3.1,
    fp16_add_pj=0.4,
    fp16_mult_pj=1.1,
    fp32_add_pj=0.9,
    fp32_mult_pj=3.7,
    sram_read_32b_pj=5.0,  # 8 KB SRAM
    dram_read_32b_pj=640.0,
    source="M. Horowitz, 'Computing's energy problem (and what we can do about it)', ISSCC 2014, 45 nm",
    node_nm=45,
)


def estimate_energy(
    macs: int | Mapping[str, int],
    bytes_moved: int,
    *,
    dtype: str = "fp32",
    memory: str = "dram",
    table: OpEnergyTable = HOROWITZ_45NM,
    latency_s: float | None = None,
) -> EnergyReading:
    """An ORDER-OF-MAGNITUDE ESTIMATE of one inference's energy, not a measurement.

    ``joules = sum(macs[d] * table.mac_pj(d)) + bytes_moved * table.byte_pj(memory)``,
    in picojoules times 1e-12. ``macs`` is a count in ``dtype`` or a mapping
    ``{"int8": n, "fp32": m}`` for a mixed-precision model; ``bytes_moved`` is
    the traffic to ``memory`` (weights + activations that do not stay on chip).
    The reading says ``method="estimated"``, ``measured=False`` and
    ``error_j = (ESTIMATE_SPREAD - 1) * joules``: the table leaves out
    instruction and control overheads that can make the real figure several
    times larger. ``latency_s`` (a measured latency) only adds a mean power.
    """
    counts = {dtype: macs} if isinstance(macs, int) else dict(macs)
    bad = {k: v for k, v in counts.items() if v < 0}
    if bad or bytes_moved < 0:
        raise ConfigError(f"estimate_energy: macs={counts}, bytes_moved={bytes_moved}; counts must be >= 0")
    pj = sum(n * table.mac_pj(d) for d, n in counts.items()) + bytes_moved * table.byte_pj(memory)
    joules = pj * 1e-12
    window = latency_s if latency_s is not None else 0.0
    mean = joules / latency_s if latency_s else None
    return EnergyReading(joules, window, mean, 0, None, "estimated", (ESTIMATE_SPREAD - 1.0) * joules, False)
