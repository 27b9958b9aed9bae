# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_orchctl_global_optspecs
    string join \n db= db-url= format= h/help V/version
end

function __fish_orchctl_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_orchctl_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_orchctl_using_subcommand
    set -l cmd (__fish_orchctl_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c orchctl -n "__fish_orchctl_needs_command" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_needs_command" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_needs_command" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_needs_command" -s V -l version -d 'Print version'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "migrate" -d 'Apply pending schema migrations (every command does this first)'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "task" -d 'Create, inspect and list tasks without Plane'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "stop" -d 'Stop a task: kill its agents, cancel its jobs, remove its worktree and branch'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "claim" -d 'Take the oldest eligible queued job and start a run of it (exit 3: none)'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "dispatch" -d 'Launch agents into free slots: reap, then claim and start jobs (run it from a timer)'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "complete" -d 'Record the outcome of a run'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "reap" -d 'Recover running jobs whose agent died (run it from cron)'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "reconcile" -d 'Cron safety net: deferred stops, orphaned leases, outbox retries, missed Plane STOPs'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "deploy-begin" -d 'Open the critical deploy window: take the merge lease, mark the deploy initiated'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "finalize-deploy" -d 'Close the deploy window and apply a deferred stop, or finish the task'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "queue" -d 'A snapshot of queues, leases, dependencies, outbox and stops for dashboards'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "event" -d 'Handle one Plane webhook delivery read from stdin'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "approve" -d 'Approve a task parked in analysis (Plane\'s Approved): on to development'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "reject" -d 'Reject a task\'s work (Plane\'s Rejected): analysis again, or back to development'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "confirm-deploy" -d 'Confirm the deploy of a task parked in deploy (Plane\'s Confirm Deploy)'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "retry" -d 'Run a stuck stage\'s failed job once more'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "metrics" -d 'Prometheus metrics: jobs, tasks, side effects, leases, waits, queue age, agents'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "prune" -d 'Housekeeping: delete old delivery hashes, done side effects and agent logs (daily)'
complete -c orchctl -n "__fish_orchctl_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c orchctl -n "__fish_orchctl_using_subcommand migrate" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand migrate" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand migrate" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand migrate" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and not __fish_seen_subcommand_from add show list log help" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and not __fish_seen_subcommand_from add show list log help" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and not __fish_seen_subcommand_from add show list log help" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and not __fish_seen_subcommand_from add show list log help" -s h -l help -d 'Print help'
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and not __fish_seen_subcommand_from add show list log help" -f -a "add" -d 'Create a task and queue the first job of its stage'
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and not __fish_seen_subcommand_from add show list log help" -f -a "show" -d 'Show a task with its jobs, lease, marker and side effects'
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and not __fish_seen_subcommand_from add show list log help" -f -a "list" -d 'List tasks, newest first'
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and not __fish_seen_subcommand_from add show list log help" -f -a "log" -d 'Print a task\'s audit trail'
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and not __fish_seen_subcommand_from add show list log help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from add" -l repo -d 'Repository name (a clone at $ORCH_REPOS_DIR/<repo>)' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from add" -l work-item -d 'Work item id, e.g. ORCH-310' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from add" -l plane-id -d 'Plane issue id (UUID)' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from add" -l project-id -d 'Plane project id (UUID)' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from add" -l branch -d 'Branch [default: feature/<work item>-<slug of the title>]' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from add" -l title -d 'Title' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from add" -l stage -d 'Stage to start in' -r -f -a "analysis\t''
development\t''
review\t''
deploy\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from add" -l depends-on -d 'A task whose completion this one waits for (repeatable)' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from add" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from add" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from add" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from add" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from show" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from show" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from show" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from show" -s h -l help -d 'Print help'
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from list" -l stage -d 'Only tasks in this stage' -r -f -a "analysis\t''
development\t''
review\t''
deploy\t''
done\t''
cancelled\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from list" -l repo -d 'Only tasks of this repo' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from list" -l limit -d 'At most this many tasks' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from list" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from list" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from list" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from list" -s h -l help -d 'Print help'
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from log" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from log" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from log" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from log" -s h -l help -d 'Print help'
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from help" -f -a "add" -d 'Create a task and queue the first job of its stage'
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from help" -f -a "show" -d 'Show a task with its jobs, lease, marker and side effects'
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from help" -f -a "list" -d 'List tasks, newest first'
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from help" -f -a "log" -d 'Print a task\'s audit trail'
complete -c orchctl -n "__fish_orchctl_using_subcommand task; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c orchctl -n "__fish_orchctl_using_subcommand stop" -l reason -d 'Why (recorded in the task and its log)' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand stop" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand stop" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand stop" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand stop" -l force -d 'Skip the critical-window check: reset even during a deploy'
complete -c orchctl -n "__fish_orchctl_using_subcommand stop" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand claim" -l agent -d 'Only jobs of this agent (repeatable)' -r -f -a "analyst\t''
developer\t''
reviewer\t''
deployer\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand claim" -l repo -d 'Only jobs of this repo' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand claim" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand claim" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand claim" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand claim" -l exec -d 'Launch the agent: the command after `--`, under a supervisor in its own session'
complete -c orchctl -n "__fish_orchctl_using_subcommand claim" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand dispatch" -l agent -d 'Only jobs of this agent (repeatable)' -r -f -a "analyst\t''
developer\t''
reviewer\t''
deployer\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand dispatch" -l repo -d 'Only jobs of this repo' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand dispatch" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand dispatch" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand dispatch" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand dispatch" -l dry-run -d 'Show what would be launched, change nothing'
complete -c orchctl -n "__fish_orchctl_using_subcommand dispatch" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand complete" -l run-id -d 'The run being completed (an agent started with --exec has it in ORCH_RUN_ID)' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand complete" -l error -d 'What went wrong (with --failure)' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand complete" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand complete" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand complete" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand complete" -l success -d 'The run succeeded'
complete -c orchctl -n "__fish_orchctl_using_subcommand complete" -l failure -d 'The run failed'
complete -c orchctl -n "__fish_orchctl_using_subcommand complete" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand reap" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand reap" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand reap" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand reap" -l dry-run -d 'Report what would change, change nothing'
complete -c orchctl -n "__fish_orchctl_using_subcommand reap" -l recover -d 'Boot-time recovery: every running job is dead (run once at boot, before agents)'
complete -c orchctl -n "__fish_orchctl_using_subcommand reap" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand reconcile" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand reconcile" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand reconcile" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand reconcile" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand deploy-begin" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand deploy-begin" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand deploy-begin" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand deploy-begin" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand finalize-deploy" -l outcome -d 'How the merge/deploy step ended' -r -f -a "success\t''
failure\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand finalize-deploy" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand finalize-deploy" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand finalize-deploy" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand finalize-deploy" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand queue" -l recent -d 'How many recent jobs, cancelled tasks and waiting tasks of each kind to list (at most 1000; blocked tasks and side effects: at least 20)' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand queue" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand queue" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand queue" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand queue" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand event" -l delivery -d 'The X-Plane-Delivery header' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand event" -l event -d 'The X-Plane-Event header' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand event" -l signature -d 'The X-Plane-Signature header (hex HMAC-SHA256 of the body)' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand event" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand event" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand event" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand event" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand approve" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand approve" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand approve" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand approve" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand reject" -l reason -d 'Why (recorded in the task log and the Plane comment)' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand reject" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand reject" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand reject" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand reject" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand confirm-deploy" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand confirm-deploy" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand confirm-deploy" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand confirm-deploy" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand retry" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand retry" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand retry" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand retry" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand metrics" -l textfile -d 'Write DIR/orchctl.prom (temporary file + rename) instead of printing' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand metrics" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand metrics" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand metrics" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand metrics" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand prune" -l older-than -d 'Keep side effects and logs of the last DAYS days' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand prune" -l db -d 'The SQLite database [default: $XDG_STATE_HOME/orchctl/orch.db]' -r -F
complete -c orchctl -n "__fish_orchctl_using_subcommand prune" -l db-url -d 'A PostgreSQL database shared by several agent hosts, instead of the SQLite file (postgres:// or postgresql:// URL; wins over --db). Prefer ORCH_DB_URL with the password in ORCH_DB_PASSWORD: a command line is visible to every user' -r
complete -c orchctl -n "__fish_orchctl_using_subcommand prune" -l format -d 'Output format [default: text on a terminal, JSON otherwise]' -r -f -a "json\t''
text\t''"
complete -c orchctl -n "__fish_orchctl_using_subcommand prune" -l dry-run -d 'Count what would be deleted, delete nothing'
complete -c orchctl -n "__fish_orchctl_using_subcommand prune" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "migrate" -d 'Apply pending schema migrations (every command does this first)'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "task" -d 'Create, inspect and list tasks without Plane'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "stop" -d 'Stop a task: kill its agents, cancel its jobs, remove its worktree and branch'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "claim" -d 'Take the oldest eligible queued job and start a run of it (exit 3: none)'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "dispatch" -d 'Launch agents into free slots: reap, then claim and start jobs (run it from a timer)'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "complete" -d 'Record the outcome of a run'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "reap" -d 'Recover running jobs whose agent died (run it from cron)'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "reconcile" -d 'Cron safety net: deferred stops, orphaned leases, outbox retries, missed Plane STOPs'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "deploy-begin" -d 'Open the critical deploy window: take the merge lease, mark the deploy initiated'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "finalize-deploy" -d 'Close the deploy window and apply a deferred stop, or finish the task'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "queue" -d 'A snapshot of queues, leases, dependencies, outbox and stops for dashboards'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "event" -d 'Handle one Plane webhook delivery read from stdin'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "approve" -d 'Approve a task parked in analysis (Plane\'s Approved): on to development'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "reject" -d 'Reject a task\'s work (Plane\'s Rejected): analysis again, or back to development'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "confirm-deploy" -d 'Confirm the deploy of a task parked in deploy (Plane\'s Confirm Deploy)'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "retry" -d 'Run a stuck stage\'s failed job once more'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "metrics" -d 'Prometheus metrics: jobs, tasks, side effects, leases, waits, queue age, agents'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "prune" -d 'Housekeeping: delete old delivery hashes, done side effects and agent logs (daily)'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and not __fish_seen_subcommand_from migrate task stop claim dispatch complete reap reconcile deploy-begin finalize-deploy queue event approve reject confirm-deploy retry metrics prune help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and __fish_seen_subcommand_from task" -f -a "add" -d 'Create a task and queue the first job of its stage'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and __fish_seen_subcommand_from task" -f -a "show" -d 'Show a task with its jobs, lease, marker and side effects'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and __fish_seen_subcommand_from task" -f -a "list" -d 'List tasks, newest first'
complete -c orchctl -n "__fish_orchctl_using_subcommand help; and __fish_seen_subcommand_from task" -f -a "log" -d 'Print a task\'s audit trail'
