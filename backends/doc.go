// Package backends will hold lfuse's storage clients for replicas — file,
// S3, Google Cloud Storage, Azure Blob Storage, SFTP — each dumb and
// stateless behind the one interface the replicator consumes. Capture (this
// stage of lfuse) writes only the local log; shipping it is the next stage.
package backends
