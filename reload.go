package main

// reloadConfig applies a re-read config on SIGHUP. (Placeholder until reload lands.)
func (a *Agent) reloadConfig() {
	a.logger.Warn("Config reload is not supported yet")
}
