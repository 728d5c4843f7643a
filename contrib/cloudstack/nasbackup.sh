#!/bin/sh
exec /usr/local/bin/bitback nasbackup "$@"
