"""The methods of SPEC §4: configs and per-batch scoring."""
