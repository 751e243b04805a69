"""Performance per period, site and version: realised once labels come back (feedback), estimated from calibrated
probabilities before they do (estimation). Part of monitoring; may use monitoring's other modules and the stages
below it."""
