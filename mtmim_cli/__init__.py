"""mtmim: age-invariant face recognition with MT-MIM (ICCV 2021)."""

__version__ = "0.1.0"
