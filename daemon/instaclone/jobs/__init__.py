"""The job layer (docs/design/states.md): admission, the undo ledger, the pipeline of steps, clone
start, recovery, templates, maintenance, guest customization and preflight.

Imports the core, the hypervisor layer (through its Protocol), the store and ``plugin_api``.
"""
