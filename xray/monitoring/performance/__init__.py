"""Performance per period, site and version: realised once labels come back (feedback), estimated from calibrated
probabilities before they do (estimation, with label_shift's prevalence and test). Part of monitoring; may use
monitoring's other modules and the stages below it."""
