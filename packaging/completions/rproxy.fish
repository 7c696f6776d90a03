# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_rproxy_global_optspecs
    string join \n h/help
end

function __fish_rproxy_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_rproxy_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_rproxy_using_subcommand
    set -l cmd (__fish_rproxy_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c rproxy -n "__fish_rproxy_needs_command" -s h -l help -d 'Print help'
complete -c rproxy -n "__fish_rproxy_needs_command" -f -a "daemon" -d 'Serve many mappings in one process, with a control socket for `ls`/`add`/`rm` and for docker-mode processes handing their ports over'
complete -c rproxy -n "__fish_rproxy_needs_command" -f -a "ls" -d 'List the daemon\'s mappings with their connections and bytes'
complete -c rproxy -n "__fish_rproxy_needs_command" -f -a "add" -d 'Add a mapping to the running daemon: [HOST_IP:]HOST_PORT[-END]:TARGET_IP:TARGET_PORT[-END][/tcp|/udp]'
complete -c rproxy -n "__fish_rproxy_needs_command" -f -a "rm" -d 'Remove a mapping from the running daemon (same spec as `add`)'
complete -c rproxy -n "__fish_rproxy_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c rproxy -n "__fish_rproxy_using_subcommand daemon" -s p -l publish -d 'A mapping: [HOST_IP:]HOST_PORT[-END]:TARGET_IP:TARGET_PORT[-END][/tcp|/udp] (repeatable; IPv6 addresses in brackets; ranges map one to one)' -r
complete -c rproxy -n "__fish_rproxy_using_subcommand daemon" -l allow -d 'Who may reach the --publish mappings from outside the host: a CIDR or an address (repeatable; default everyone). Processes of the host itself always may' -r
complete -c rproxy -n "__fish_rproxy_using_subcommand daemon" -l config -d 'TOML config file with `publish = [...]` (default /etc/rproxy/rproxy.toml if present); re-read on SIGHUP' -r -F
complete -c rproxy -n "__fish_rproxy_using_subcommand daemon" -l control-socket -d 'Control socket path (default: $RPROXY_SOCKET, else /run/rproxy/rproxy.sock)' -r -F
complete -c rproxy -n "__fish_rproxy_using_subcommand daemon" -l drain-timeout -d 'Seconds (0 to 86400) open connections may take to finish when their mapping is removed or the daemon stops [default: 10]' -r
complete -c rproxy -n "__fish_rproxy_using_subcommand daemon" -l nat -d 'Kernel fast path: install nftables DNAT rules for each mapping (loopback and hairpin clients stay on the userland listener). `--nat` or `--nat=on` falls back to userland with a warning when the kernel path is unavailable; `--nat=require` fails instead' -r
complete -c rproxy -n "__fish_rproxy_using_subcommand daemon" -l socket-lb -d 'Socket-level fast path: cgroup socket hooks send loopback and host clients of each mapping straight to its target (the listener serves the rest). `--socket-lb` or `--socket-lb=on` falls back to the listener with a warning when the kernel cannot have them; `--socket-lb=require` fails instead' -r
complete -c rproxy -n "__fish_rproxy_using_subcommand daemon" -l docker-host -d 'dockerd\'s API socket, from which the socket hooks learn which containers share a network with icc on, to send their hairpin clients straight to the target (default: $DOCKER_HOST, else unix:///var/run/docker.sock; "" for none: containers then reach published ports through the listeners)' -r
complete -c rproxy -n "__fish_rproxy_using_subcommand daemon" -l log-format -d 'Log lines as text or as JSON objects (default: $RPROXY_LOG_FORMAT, else text)' -r -f -a "text\t''
json\t''"
complete -c rproxy -n "__fish_rproxy_using_subcommand daemon" -l metrics-addr -d 'Serve Prometheus metrics at http://HOST:PORT/metrics (default: $RPROXY_METRICS_ADDR, else none)' -r
complete -c rproxy -n "__fish_rproxy_using_subcommand daemon" -l docker-ports -d 'Serve the published ports of dockerd\'s containers, read from its API (see --docker-host), when dockerd runs without a userland proxy ("userland-proxy": false): the socket hooks carry host clients (127.0.0.1, [::1], host addresses) and hairpin clients, dockerd\'s DNAT remote ones, with no process per port. Turns the socket hooks on as --socket-lb=on does, unless --socket-lb or the config file says otherwise'
complete -c rproxy -n "__fish_rproxy_using_subcommand daemon" -l metrics-per-port -d 'One series set per port: by default a published range (contiguous ports to one target) is one set, summed, so a 1,000-port range costs what one port does'
complete -c rproxy -n "__fish_rproxy_using_subcommand daemon" -l takeover -d 'Take over from the daemon running on the control socket: receive every listening socket (and each shim\'s registration), serve them, then let it drain its connections and exit. No daemon there: start as usual. (SIGHUP after an upgrade, and SIGUSR2, make a running daemon start its successor this way.)'
complete -c rproxy -n "__fish_rproxy_using_subcommand daemon" -l check -d 'Check the flags, the config file and the RPROXY_* environment, print the mappings they make and exit: 0 when all is well, 2 listing every problem. Binds nothing'
complete -c rproxy -n "__fish_rproxy_using_subcommand daemon" -s h -l help -d 'Print help'
complete -c rproxy -n "__fish_rproxy_using_subcommand ls" -l control-socket -d 'The daemon\'s control socket (default: $RPROXY_SOCKET, else /run/rproxy/rproxy.sock)' -r -F
complete -c rproxy -n "__fish_rproxy_using_subcommand ls" -l json -d 'Print the rows as a JSON array (the fields of the control protocol\'s rows), for scripts'
complete -c rproxy -n "__fish_rproxy_using_subcommand ls" -s h -l help -d 'Print help'
complete -c rproxy -n "__fish_rproxy_using_subcommand add" -l control-socket -d 'The daemon\'s control socket (default: $RPROXY_SOCKET, else /run/rproxy/rproxy.sock)' -r -F
complete -c rproxy -n "__fish_rproxy_using_subcommand add" -l nat -d 'Kernel NAT for this mapping: on (fall back to userland), require, or off (default: the daemon\'s --nat)' -r
complete -c rproxy -n "__fish_rproxy_using_subcommand add" -l socket-lb -d 'Socket hooks for this mapping\'s host clients: on (fall back to the listener), require, or off (default: the daemon\'s --socket-lb)' -r
complete -c rproxy -n "__fish_rproxy_using_subcommand add" -l proxy-protocol -d 'Start every backend connection with a PROXY protocol header (v1: text, v2: binary) carrying the client\'s address; TCP only, off by default. The backend must expect it (nginx: `listen … proxy_protocol`, HAProxy: `accept-proxy`)' -r
complete -c rproxy -n "__fish_rproxy_using_subcommand add" -l allow -d 'Who may reach it from outside the host: a CIDR or an address (repeatable; default everyone). Processes of the host itself always may' -r
complete -c rproxy -n "__fish_rproxy_using_subcommand add" -s h -l help -d 'Print help'
complete -c rproxy -n "__fish_rproxy_using_subcommand rm" -l control-socket -d 'The daemon\'s control socket (default: $RPROXY_SOCKET, else /run/rproxy/rproxy.sock)' -r -F
complete -c rproxy -n "__fish_rproxy_using_subcommand rm" -s h -l help -d 'Print help'
complete -c rproxy -n "__fish_rproxy_using_subcommand help; and not __fish_seen_subcommand_from daemon ls add rm help" -f -a "daemon" -d 'Serve many mappings in one process, with a control socket for `ls`/`add`/`rm` and for docker-mode processes handing their ports over'
complete -c rproxy -n "__fish_rproxy_using_subcommand help; and not __fish_seen_subcommand_from daemon ls add rm help" -f -a "ls" -d 'List the daemon\'s mappings with their connections and bytes'
complete -c rproxy -n "__fish_rproxy_using_subcommand help; and not __fish_seen_subcommand_from daemon ls add rm help" -f -a "add" -d 'Add a mapping to the running daemon: [HOST_IP:]HOST_PORT[-END]:TARGET_IP:TARGET_PORT[-END][/tcp|/udp]'
complete -c rproxy -n "__fish_rproxy_using_subcommand help; and not __fish_seen_subcommand_from daemon ls add rm help" -f -a "rm" -d 'Remove a mapping from the running daemon (same spec as `add`)'
complete -c rproxy -n "__fish_rproxy_using_subcommand help; and not __fish_seen_subcommand_from daemon ls add rm help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
