"""Options that work anywhere on a minicaffe command line, taken out before argparse sees it."""

__all__ = ["take_option"]


def take_option(argv, option, what):
    """Split every `option X` / `option=X` out of argv (up to a bare `--`).

    Returns (the remaining argv, [X, ...]); `what` names the missing value in the error.
    """
    rest, values = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg == option:
            if i + 1 >= len(argv):
                raise ValueError(f"{option} needs {what}")
            values.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith(option + "="):
            values.append(arg[len(option) + 1:])
        else:
            rest.append(arg)
        i += 1
    return rest, values
