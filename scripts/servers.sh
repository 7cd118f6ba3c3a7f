#!/usr/bin/env bash
# Installs (once, cached outside the clone) and starts the real storage
# servers the backend tests run against, all on 127.0.0.1:
#
#   S3     versitygw (posix backend), plain on :7070 and TLS on :7443
#   GCS    fake-gcs-server on :4443
#   Azure  Azurite (blob) on :10000
#   SFTP   OpenSSH sshd on :2222, user lfusetest (password and key)
#
# Usage: scripts/servers.sh start|stop|env
# "start" is idempotent: servers already answering are left alone. It writes
# $LFUSE_SERVERS_DIR/env (default /tmp/lfuse-servers/env), which the tests
# read to find the servers; without it they skip and name this script.
# The credentials are throwaway test values, not secrets.
set -euo pipefail

tools=${LFUSE_TOOLS:-$HOME/.cache/lfuse-tools}
dir=${LFUSE_SERVERS_DIR:-/tmp/lfuse-servers}
versitygw_version=v1.8.0
fakegcs_version=v1.56.1
azurite_version=3.35.0
s3_key=lfuse-test-access-key
s3_secret=lfuse-test-secret-key
sftp_user=lfusetest
sftp_password=lfuse-test-password
# Azurite's documented development account key (public, the same everywhere).
azure_account=devstoreaccount1
azure_key='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='

log() { echo "servers: $*" >&2; }

# listening PORT: is anything accepting connections on 127.0.0.1:PORT?
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
	local port=$1 name=$2 logf=$3
	for _ in $(seq 1 300); do
		listening "$port" && return 0
		sleep 0.1
	done
	log "$name did not start listening on 127.0.0.1:$port; its log ($logf):"
	tail -20 "$logf" >&2 || true
	exit 1
}

install_versitygw() {
	local bin=$tools/versitygw-$versitygw_version/versitygw
	if [ ! -x "$bin" ]; then
		log "building versitygw $versitygw_version (once, a few minutes)"
		GOBIN=$(dirname "$bin") go install -ldflags='-s -w' "github.com/versity/versitygw/cmd/versitygw@$versitygw_version" >&2
	fi
	echo "$bin"
}

install_fakegcs() {
	local bin=$tools/fake-gcs-server-$fakegcs_version/fake-gcs-server
	if [ ! -x "$bin" ]; then
		log "building fake-gcs-server $fakegcs_version (once)"
		GOBIN=$(dirname "$bin") go install -ldflags='-s -w' "github.com/fsouza/fake-gcs-server@$fakegcs_version" >&2
	fi
	echo "$bin"
}

install_azurite() {
	local prefix=$tools/azurite-$azurite_version
	if [ ! -x "$prefix/node_modules/.bin/azurite-blob" ]; then
		command -v npm >/dev/null || apt_install nodejs npm
		log "installing Azurite $azurite_version from npm (once)"
		mkdir -p "$prefix"
		npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error "azurite@$azurite_version" >&2
	fi
	echo "$prefix/node_modules/.bin/azurite-blob"
}

apt_install() {
	if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
		log "please install: $*"
		exit 1
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >/dev/null
	apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

certs() {
	[ -f "$dir/tls/cert.pem" ] && return
	mkdir -p "$dir/tls"
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
		-subj /CN=localhost -addext 'subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1' \
		-keyout "$dir/tls/key.pem" -out "$dir/tls/cert.pem" 2>/dev/null
}

start_s3() {
	local bin=$1
	for spec in "7070 s3" "7443 s3tls"; do
		set -- $spec
		listening "$1" && continue
		mkdir -p "$dir/$2"
		local tls=()
		[ "$2" = s3tls ] && tls=(--cert "$dir/tls/cert.pem" --key "$dir/tls/key.pem")
		ROOT_ACCESS_KEY=$s3_key ROOT_SECRET_KEY=$s3_secret \
			setsid "$bin" --port "127.0.0.1:$1" --quiet "${tls[@]}" posix "$dir/$2" \
			>"$dir/$2.log" 2>&1 </dev/null &
		echo $! >"$dir/$2.pid"
		wait_port "$1" versitygw "$dir/$2.log"
	done
}

start_gcs() {
	listening 4443 && return
	mkdir -p "$dir/gcs"
	setsid "$1" -scheme http -host 127.0.0.1 -port 4443 -public-host 127.0.0.1:4443 \
		-external-url http://127.0.0.1:4443 -backend filesystem -filesystem-root "$dir/gcs" \
		-log-level warn >"$dir/gcs.log" 2>&1 </dev/null &
	echo $! >"$dir/gcs.pid"
	wait_port 4443 fake-gcs-server "$dir/gcs.log"
}

start_azurite() {
	listening 10000 && return
	mkdir -p "$dir/azurite"
	setsid "$1" --blobHost 127.0.0.1 --blobPort 10000 --location "$dir/azurite" \
		--skipApiVersionCheck --loose --disableTelemetry --silent >"$dir/azurite.log" 2>&1 </dev/null &
	echo $! >"$dir/azurite.pid"
	wait_port 10000 Azurite "$dir/azurite.log"
}

start_sshd() {
	command -v /usr/sbin/sshd >/dev/null || apt_install openssh-server
	command -v ssh-keygen >/dev/null || apt_install openssh-client
	if ! id "$sftp_user" >/dev/null 2>&1; then
		useradd -m -s /bin/sh "$sftp_user"
	fi
	echo "$sftp_user:$sftp_password" | chpasswd
	local home
	home=$(getent passwd "$sftp_user" | cut -d: -f6)
	mkdir -p "$dir/ssh"
	[ -f "$dir/ssh/host_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/ssh/host_key"
	[ -f "$dir/ssh/client_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/ssh/client_key"
	# sshd refuses keys kept under /tmp (StrictModes): they live in the home.
	install -d -m 700 -o "$sftp_user" "$home/.ssh"
	install -m 600 -o "$sftp_user" "$dir/ssh/client_key.pub" "$home/.ssh/authorized_keys"
	echo "[127.0.0.1]:2222 $(cut -d' ' -f1-2 "$dir/ssh/host_key.pub")" >"$dir/ssh/known_hosts"
	listening 2222 && return
	cat >"$dir/ssh/sshd_config" <<EOF
Port 2222
ListenAddress 127.0.0.1
HostKey $dir/ssh/host_key
PidFile $dir/sshd.pid
UsePAM no
PasswordAuthentication yes
PubkeyAuthentication yes
AllowUsers $sftp_user
Subsystem sftp internal-sftp
EOF
	mkdir -p /run/sshd
	/usr/sbin/sshd -E "$dir/sshd.log" -f "$dir/ssh/sshd_config"
	wait_port 2222 sshd "$dir/sshd.log"
}

write_env() {
	cat >"$dir/env.tmp" <<EOF
LFUSE_TEST_S3_ENDPOINT=http://127.0.0.1:7070
LFUSE_TEST_S3_TLS_ENDPOINT=https://127.0.0.1:7443
LFUSE_TEST_S3_ACCESS_KEY_ID=$s3_key
LFUSE_TEST_S3_SECRET_ACCESS_KEY=$s3_secret
LFUSE_TEST_TLS_CA=$dir/tls/cert.pem
LFUSE_TEST_GCS_ENDPOINT=http://127.0.0.1:4443
LFUSE_TEST_AZURE_ENDPOINT=http://127.0.0.1:10000/$azure_account/
LFUSE_TEST_AZURE_ACCOUNT=$azure_account
LFUSE_TEST_AZURE_KEY=$azure_key
LFUSE_TEST_SFTP_ADDR=127.0.0.1:2222
LFUSE_TEST_SFTP_USER=$sftp_user
LFUSE_TEST_SFTP_PASSWORD=$sftp_password
LFUSE_TEST_SFTP_KEY=$dir/ssh/client_key
LFUSE_TEST_SFTP_KNOWN_HOSTS=$dir/ssh/known_hosts
LFUSE_TEST_SERVERS_DIR=$dir
LFUSE_TEST_VERSITYGW=$(cat "$dir/.versitygw-bin")
EOF
	mv "$dir/env.tmp" "$dir/env"
}

stop() {
	for name in s3 s3tls gcs azurite sshd; do
		if [ -f "$dir/$name.pid" ]; then
			kill "$(cat "$dir/$name.pid")" 2>/dev/null || true
			rm -f "$dir/$name.pid"
		fi
	done
	rm -f "$dir/env"
}

case ${1:-} in
start)
	mkdir -p "$dir" "$tools"
	command -v openssl >/dev/null || apt_install openssl
	certs
	# The builds and the npm install run side by side: most of a cold start.
	(install_versitygw >"$dir/.versitygw-bin") & p1=$!
	(install_fakegcs >"$dir/.fakegcs-bin") & p2=$!
	(install_azurite >"$dir/.azurite-bin") & p3=$!
	start_sshd
	wait $p1 && wait $p2 && wait $p3
	start_s3 "$(cat "$dir/.versitygw-bin")"
	start_gcs "$(cat "$dir/.fakegcs-bin")"
	start_azurite "$(cat "$dir/.azurite-bin")"
	write_env
	log "all up; settings in $dir/env"
	;;
stop) stop ;;
env) cat "$dir/env" ;;
*)
	echo "usage: $0 start|stop|env" >&2
	exit 2
	;;
esac
