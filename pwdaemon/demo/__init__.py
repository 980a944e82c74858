"""The demo: a bundled small model under shifting synthetic traffic, with a live view.

Modules: `args` (the `pwdaemon demo` command), `options` (what a run does), `run` (the
traffic loop), `live` and `plain` (the two views), `summary` (end-of-run figures and
tables), `records` (what a run saw), `style` (colours, formats), `traffic` (the seeded
traffic). Nothing is re-exported here, so that the benchmarks can import `traffic`
without loading pwdaemon's engine into the processes they measure.
"""
