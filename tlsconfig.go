package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// The TLS configs of health checks are built here and nowhere else: HTTPSTLSConfig loads the base
// from the https_* files once per start or reload, and checkTLSConfig derives each check's config
// from it. The Consul client's TLS (ca_file, cert_file, ... and CONSUL_CACERT and friends) is not
// built here: APIConfig hands those paths to the api package, which loads them itself.

// HTTPSTLSConfig builds the TLS config for HTTPS, TCP+TLS and gRPC+TLS health checks from the https_*
// keys. It returns nil, nil when none is set. Callers clone it before setting per-check options.
func (c *Config) HTTPSTLSConfig() (*tls.Config, error) {
	if c.HTTPSCAFile == "" && c.HTTPSCAPath == "" && c.HTTPSCertFile == "" && c.HTTPSKeyFile == "" {
		return nil, nil
	}
	tc := &tls.Config{}
	if c.HTTPSCAFile != "" || c.HTTPSCAPath != "" {
		pool := x509.NewCertPool()
		if c.HTTPSCAFile != "" {
			if err := configAddPEMFile(pool, c.HTTPSCAFile); err != nil {
				return nil, fmt.Errorf("https_ca_file: %w", err)
			}
		}
		if c.HTTPSCAPath != "" {
			if err := configAddPEMDir(pool, c.HTTPSCAPath); err != nil {
				return nil, fmt.Errorf("https_ca_path: %w", err)
			}
		}
		tc.RootCAs = pool
	}
	switch {
	case c.HTTPSCertFile != "" && c.HTTPSKeyFile != "":
		cert, err := tls.LoadX509KeyPair(c.HTTPSCertFile, c.HTTPSKeyFile)
		if err != nil {
			return nil, fmt.Errorf("https_cert_file/https_key_file: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	case c.HTTPSCertFile != "":
		return nil, errors.New("https_cert_file is set but https_key_file is not")
	case c.HTTPSKeyFile != "":
		return nil, errors.New("https_key_file is set but https_cert_file is not")
	}
	return tc, nil
}

func configAddPEMFile(pool *x509.CertPool, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if !pool.AppendCertsFromPEM(data) {
		return fmt.Errorf("no PEM certificates found in %q", path)
	}
	return nil
}

func configAddPEMDir(pool *x509.CertPool, dir string) error {
	found := false
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if pool.AppendCertsFromPEM(data) {
			found = true
		}
		return nil
	})
	if err != nil {
		return err
	}
	if !found {
		return fmt.Errorf("no PEM certificates found in %q", dir)
	}
	return nil
}

// tlsKey identifies the per-check TLS overrides; HTTP transports are shared per key because a
// transport's TLS config is fixed once it has dialled.
type tlsKey struct {
	skipVerify bool
	serverName string
}

// checkTLSConfig returns a fresh config for one check: a clone of base (mTLS material, CAs; nil for
// none) with the check's own verification overrides, as Consul's OutgoingTLSConfigForCheck does.
// The result is the caller's to change.
func checkTLSConfig(base *tls.Config, k tlsKey) *tls.Config {
	cfg := &tls.Config{}
	if base != nil {
		cfg = base.Clone()
	}
	cfg.InsecureSkipVerify = k.skipVerify
	if k.serverName != "" {
		cfg.ServerName = k.serverName
	}
	return cfg
}
