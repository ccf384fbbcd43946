"""What every part of alexray shares and none needs torch for: the job spec, errors, a run's layout, local clusters, metrics discovery."""
