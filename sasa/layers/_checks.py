"""Argument checks shared by the layers: each error names the argument and what is allowed."""


def check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_odd_kernel(name, value):
    check_positive_int(name, value)
    if value % 2 == 0:
        raise ValueError(f"{name} must be odd so the window is centred on its pixel, got {value}")


def check_divisible(name, value, divisor, why):
    if value % divisor:
        raise ValueError(f"{name}={value} must be divisible by {divisor} ({why})")
