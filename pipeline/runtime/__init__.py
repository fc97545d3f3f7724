"""Process plumbing shared by the servers: process set-up, logging, gRPC, TLS, import hooks."""
