"""The two errors users see: a config that cannot be applied, and a forward that cannot be pruned."""


class ConfigError(ValueError):
    """A config or strategy that cannot be applied; the message says what is accepted."""


class PruningError(RuntimeError):
    """A forward that the runtime cannot prune; the message says why and what to do instead."""


class NoSearchSpace(ConfigError):
    """A method with nothing to tune besides the budget: `optimize` evaluates its default strategy."""


class CalibrationWarning(UserWarning):
    """VFlowOpt's calibration set K was empty (every token's attention used instead); see the README."""
