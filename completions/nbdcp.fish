complete -c nbdcp -s C -l connections -d 'Connections to each NBD endpoint (workers for other kinds)' -r -f
complete -c nbdcp -s p -l progress -d 'Show a progress bar, or with =FD write "N/100" lines to FD' -r -f
complete -c nbdcp -l queue-size -d 'Bytes of data in flight per connection' -r -f
complete -c nbdcp -l request-size -d 'Largest request, a power of two from 4K to 32M [default: 1M on NBD Unix sockets, 256K otherwise]' -r -f
complete -c nbdcp -s R -l requests -d 'Requests in flight per connection' -r -f
complete -c nbdcp -s S -l sparse -d 'Detect runs of zero bytes of this size in data (0 turns it off)' -r -f
complete -c nbdcp -s T -l threads -d 'Most workers (0: the number of cores, plus one when the source is an NBD server)' -r -f
complete -c nbdcp -l timeout -d 'Fail an NBD request that takes longer than this many seconds' -r -f
complete -c nbdcp -l retries -d 'Retry a segment this many times after a dropped or stalled NBD connection, reconnecting first (0: never)' -r -f
complete -c nbdcp -l source-offset -d 'Copy from this byte of the source on (as dd\'s skip)' -r -f
complete -c nbdcp -l destination-offset -d 'Write from this byte of the destination on (as dd\'s seek)' -r -f
complete -c nbdcp -l length -d 'Copy this many bytes (as dd\'s count) [default: to the end of the source]' -r -f
complete -c nbdcp -l journal -d 'Record finished segments in FILE, to resume after an interruption' -r -F
complete -c nbdcp -l rate -d 'Read at most SIZE bytes of data a second from the source' -r -f
complete -c nbdcp -l blkhash -d 'Compute the blkhash of the source while copying and print it' -r -f
complete -c nbdcp -l blkhash-file -d 'Write the blkhash to FILE instead of standard output' -r -F
complete -c nbdcp -l allocated -d 'Leave the destination fully allocated (no holes)'
complete -c nbdcp -l destination-is-zero -l target-is-zero -d 'The destination already reads as zeroes: skip zeroing it'
complete -c nbdcp -l flush -d 'Flush the destination at the end (the default)'
complete -c nbdcp -l no-flush -d 'Do not flush the destination at the end'
complete -c nbdcp -l no-extents -d 'Do not ask the source which parts hold data; read everything'
complete -c nbdcp -l synchronous -d 'One connection, one request at a time'
complete -c nbdcp -l verify -d 'After the copy, read the destination back and compare it with the source'
complete -c nbdcp -s v -l verbose -d 'Say more (repeat for more detail)'
complete -c nbdcp -s h -l help -d 'Print help (see more with \'--help\')'
complete -c nbdcp -s V -l version -d 'Print version'
