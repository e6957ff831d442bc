"""`minicaffe layers`: every layer type a prototxt can name, and where each comes from.

    minicaffe layers                         # built-ins, plugins, entry points
    minicaffe layers --plugin my_layers.py   # check that a plugin registers what you expect
    minicaffe layers --custom                # only the types from outside minicaffe
"""


def register(subparsers):
    p = subparsers.add_parser(
        "layers", help="list the registered layer types and where they come from",
        description="List every layer type usable as `type:` in a prototxt: the built-ins, "
                    "layers from --plugin modules, $MINICAFFE_PLUGINS and installed "
                    "'minicaffe.layers' entry points. Python layers (type: \"Python\") name "
                    "their class in python_param and are not listed one by one.")
    p.add_argument("--custom", action="store_true", help="only list types defined outside minicaffe")
    p.set_defaults(func=run, runs_without_plugins=True)  # lists what did load


def run(args):
    from .. import plugins
    from ..layer import layer_registry, layer_source

    plugins.load_default_plugins(strict=False)  # the CLI has warned about a stale entry
    rows = []
    for name in sorted(layer_registry(), key=str.lower):
        source = layer_source(name) or "?"
        if args.custom and source.startswith("built-in"):
            continue
        rows.append((name, source))
    width = max([len("TYPE")] + [len(n) for n, _ in rows])
    print(f"{'TYPE':<{width}}  SOURCE")
    for name, source in rows:
        print(f"{name:<{width}}  {source}")
    builtin = sum(1 for n in layer_registry() if (layer_source(n) or "").startswith("built-in"))
    total = len(layer_registry())
    print(f"\n{total} layer types: {builtin} built-in, {total - builtin} from plugins or user code.")
    for spec, description in plugins.loaded_plugins():
        print(f"loaded {description}")
    for description, reason in plugins.failed_plugins():
        print(f"FAILED {description}: {reason}")
    return 0
