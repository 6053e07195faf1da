#compdef nbdcp

autoload -U is-at-least

_nbdcp() {
    typeset -A opt_args
    typeset -a _arguments_options
    local ret=1

    if is-at-least 5.2; then
        _arguments_options=(-s -S -C)
    else
        _arguments_options=(-s -C)
    fi

    local context curcontext="$curcontext" state line
    _arguments "${_arguments_options[@]}" : \
'-C+[Connections to each NBD endpoint (workers for other kinds)]:N:' \
'--connections=[Connections to each NBD endpoint (workers for other kinds)]:N:' \
'-p+[Show a progress bar, or with =FD write "N/100" lines to FD]::FD|json:FD:' \
'--progress=[Show a progress bar, or with =FD write "N/100" lines to FD]::FD|json:FD:' \
'--queue-size=[Bytes of data in flight per connection]:SIZE:' \
'--request-size=[Largest request, a power of two from 4K to 32M \[default\: 1M on NBD Unix sockets, 256K otherwise\]]:SIZE:' \
'-R+[Requests in flight per connection]:N:' \
'--requests=[Requests in flight per connection]:N:' \
'-S+[Detect runs of zero bytes of this size in data (0 turns it off)]:SIZE:' \
'--sparse=[Detect runs of zero bytes of this size in data (0 turns it off)]:SIZE:' \
'-T+[Most workers (0\: the number of cores, plus one when the source is an NBD server)]:N:' \
'--threads=[Most workers (0\: the number of cores, plus one when the source is an NBD server)]:N:' \
'--timeout=[Fail an NBD request that takes longer than this many seconds]:SECONDS:' \
'--retries=[Retry a segment this many times after a dropped or stalled NBD connection, reconnecting first (0\: never)]:N:' \
'--source-offset=[Copy from this byte of the source on (as dd'\''s skip)]:N:' \
'--destination-offset=[Write from this byte of the destination on (as dd'\''s seek)]:N:' \
'--length=[Copy this many bytes (as dd'\''s count) \[default\: to the end of the source\]]:N:' \
'--journal=[Record finished segments in FILE, to resume after an interruption]:FILE:_files' \
'--rate=[Read at most SIZE bytes of data a second from the source]:SIZE:' \
'--blkhash=[Compute the blkhash of the source while copying and print it]::ALG[/SIZE]:' \
'--blkhash-file=[Write the blkhash to FILE instead of standard output]:FILE:_files' \
'--allocated[Leave the destination fully allocated (no holes)]' \
'--destination-is-zero[The destination already reads as zeroes\: skip zeroing it]' \
'--target-is-zero[The destination already reads as zeroes\: skip zeroing it]' \
'--flush[Flush the destination at the end (the default)]' \
'--no-flush[Do not flush the destination at the end]' \
'--no-extents[Do not ask the source which parts hold data; read everything]' \
'--synchronous[One connection, one request at a time]' \
'--verify[After the copy, read the destination back and compare it with the source]' \
'*-v[Say more (repeat for more detail)]' \
'*--verbose[Say more (repeat for more detail)]' \
'-h[Print help (see more with '\''--help'\'')]' \
'--help[Print help (see more with '\''--help'\'')]' \
'-V[Print version]' \
'--version[Print version]' \
'*::endpoints -- SOURCE and DESTINATION:_files' \
&& ret=0
}

(( $+functions[_nbdcp_commands] )) ||
_nbdcp_commands() {
    local commands; commands=()
    _describe -t commands 'nbdcp commands' commands "$@"
}

if [ "$funcstack[1]" = "_nbdcp" ]; then
    _nbdcp "$@"
else
    compdef _nbdcp nbdcp
fi
