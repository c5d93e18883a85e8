# Anti-flapping: a passing check turns critical only after 3+1 more failures than passes, and a
# critical one turns passing after 2+1 more passes than failures.
passing_threshold  = 2
critical_threshold = 3
