"""The lab: the demo, evaluations and the scripts that train the bundled assets.

Nothing outside ``lab/`` and ``cli/`` imports it. :mod:`~persona_plugin.lab.demo` is
``persona demo``; :mod:`~persona_plugin.lab.eval` holds the LoCoMo recall and fact
extraction benchmarks; :mod:`~persona_plugin.lab.training` rebuilds what ships in
``persona_plugin/assets`` (``python -m persona_plugin.lab.training.demo_adapters``,
``.reflection``, ``.preferences``, ``.gate``).
"""
