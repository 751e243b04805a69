"""Change control (issue #45): the predetermined change plan applied to each candidate (``plan``: its record, the
differences from the champion's, their classification and the plan's criteria as the gate), the impact report of
each candidate (``impact``) and the tamper-evident audit trail of every decision (``audit``). Uses the registry's
gate (the rule), nothing of its I/O: the steps read and write through the store and the stack's artifact store."""
